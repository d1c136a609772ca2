"""clipbatch: label and embed large image corpora with CLIP models on Ray Data."""

__version__ = "0.1.0"


def run(spec_or_path, overrides: dict | None = None):
    """Run a job spec (YAML path, dict or JobSpec) and return its RunSummary."""
    from clipbatch.pipeline.job import build  # Ray and torch: imported when a job runs

    return build(spec_or_path, overrides).run()
