rule split:
    input:
        cocos=slice_cocos,
        participants=f"{RESULTS}/deid/participants.csv",
    output:
        train=f"{RESULTS}/split/train.json",
        val=f"{RESULTS}/split/val.json",
        test=f"{RESULTS}/split/test.json",
        assignments=f"{RESULTS}/split/assignments.csv",
        group_counts=f"{RESULTS}/split/group_counts.csv",
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{BENCH}/split.tsv"
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "spinedet split --config {EFFECTIVE_CONFIG} --cocos {input.cocos}"
        " --out {RESULTS}/split > {log} 2>&1"
