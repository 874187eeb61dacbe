from pathlib import Path

import yaml

RESULTS = config["results"]
RESTRICTED = config["restricted"]
MODELS = list(config["models"])
LOGS = "logs"
BENCH = "benchmarks/rules"

# The verbs read the merged, validated config from one file. It is rewritten
# only when its content changes; each rule's `settings` param holds the part
# of the config it depends on, so a change reruns just those rules.
EFFECTIVE_CONFIG = f"{RESULTS}/effective_config.yaml"
_effective = yaml.safe_dump(config, sort_keys=True)
_effective_path = Path(EFFECTIVE_CONFIG)
if not _effective_path.exists() or _effective_path.read_text() != _effective:
    _effective_path.parent.mkdir(parents=True, exist_ok=True)
    _effective_path.write_text(_effective)

# The pseudonym key: the configured file; with the demo, the synthetic export's
# own key (derived from demo.seed, so a fresh clone gets the same pseudonyms and
# split); else none, and deidentify creates restricted/pseudonym.key once.
PSEUDONYM_KEY = config["deidentify"]["key_file"] or (
    f"{config['demo']['out']}/pseudonym.key" if config["demo"]["enabled"] else None
)

# Rules that read PHI run on the submitting host, never on compute nodes.
localrules:
    synthesize,
    inventory,
    convert,
    deidentify,

