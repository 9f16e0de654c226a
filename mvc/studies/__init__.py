"""Studies built on the stages: the mixing-granularity ablation, the diagnosis of a generator, and the end-to-end
pipeline's plan and report."""
