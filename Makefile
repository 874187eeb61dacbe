# The README's commands. Each creates .venv when it is missing and installs
# the project into it; the install is skipped while pyproject.toml is
# unchanged. `make install` does only that (a SLURM login node: no training).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: install demo test test-slow smoke lint clean view

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)
	@echo "installed: source $(VENV)/bin/activate puts snakemake and spinedet on PATH"

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m slow --durations=15

smoke: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores $(CORES) --configfile config.yaml config/smoke.yaml

lint: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --lint

# make view VIEW="STUDY_FOLDER PREDICTIONS/detections_sr.dcm": spinedet view, the OHIF viewer
# beside a throw-away local Orthanc holding VIEW's DICOM files (README, "Viewing in OHIF").
view: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/spinedet view $(VIEW)

clean:
	rm -rf results/* restricted smoke smoke-bids .snakemake resources/demo_export resources/smoke_export resources/smoke_bids_export
	touch results/.gitkeep
