"""Study: trained models in, the comparison report out.

- evaluate, speed, compare, cv, report: one verb each;
- metrics: COCO, VOC and FROC metrics, bootstraps and patient-level results;
- timing: latency statistics and the record of the machine;
- report_tables, report_figures, report_methods: what the report verb
  assembles; templates/: its HTML and Markdown.
"""
