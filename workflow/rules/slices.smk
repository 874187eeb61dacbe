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
    conda:
        "../../envs/preprocess.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "spinedet slices --config {EFFECTIVE_CONFIG} --volume {input.volume}"
        " --boxes {input.boxes} --out {RESULTS}/slices > {log} 2>&1"
