import json
from pathlib import Path

from spinedet.config import pseudonym_key_file, study_models

RESULTS = config["results"]
RESTRICTED = config["restricted"]
# study.models, else every entry of models:
MODELS = study_models(config)
# split.folds >= 2: each model is also trained once per cross-validation fold
FOLDS = list(range(config["split"]["folds"]))


wildcard_constraints:
    model="[^/]+",
    fold=r"\d+",
# Logs and benchmark files live with the results they belong to, so two
# studies with different `results` folders never share them.
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"



def verb_config(*sections, models=None):
    """The config sections a verb reads, as one inline JSON argument (see
    spinedet.config.load). It is a param of the rule, so Snakemake's params
    trigger reruns exactly the rules whose sections changed, and nothing is
    written at parse time. A section may be one key of a section
    ("evaluate.score_threshold"). `models`: only these entries of `models:`."""
    chosen = {}
    for section in sections:
        top, _, key = section.partition(".")
        if key:
            chosen.setdefault(top, {})[key] = config[top][key]
        else:
            chosen[top] = config[top]
    if models is not None:
        chosen["models"] = {name: config["models"][name] for name in models}
    return json.dumps(chosen, sort_keys=True)


# The pseudonym key (spinedet.config.pseudonym_key_file): the configured file,
# the demo export's own key, else none (deidentify makes restricted/pseudonym.key once).
PSEUDONYM_KEY = pseudonym_key_file(config)

# Rules that read PHI run on the submitting host, never on compute nodes. Each
# marks itself `localrule: True` in its own file: which rules exist depends on
# raw_format (and demo.enabled), and a localrules list naming an absent rule warns.
