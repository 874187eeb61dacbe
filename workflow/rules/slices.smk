rule slices:
    input:
        volume=f"{RESULTS}/deid/sub-{{subject}}/anat/sub-{{subject}}_T2w.nii.gz",
        boxes=f"{RESULTS}/deid/sub-{{subject}}/sub-{{subject}}_boxes.json",
    output:
        coco=f"{RESULTS}/slices/sub-{{subject}}/coco.json",
        dropped=f"{RESULTS}/slices/sub-{{subject}}/dropped_boxes.csv",
    log:
        f"{LOGS}/slices/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/slices/sub-{{subject}}.tsv"
    params:
        # The config this rule depends on: a change reruns it.
        settings={"slices": config["slices"], "classes": config["classes"]},
        config=EFFECTIVE_CONFIG,
        out=lambda wildcards, output: Path(output.coco).parent.parent,
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "spinedet slices --config {params.config} --volume {input.volume}"
        " --boxes {input.boxes} --out {params.out} > {log} 2>&1"
