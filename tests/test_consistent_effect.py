"""Consistency effect on a tiny random-weight pipeline: panel similarity of the shared layers' outputs rises."""
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_consistent_quality import feature_similarity, run_story  # noqa: E402

from _story_tiny import tiny_sd_pipeline  # noqa: E402


def test_panels_more_similar_with_consistent_attention():
    warnings.filterwarnings("ignore")
    pipe = tiny_sd_pipeline(max_length=32)
    chars, panels = "[Bob] a man in a red hat", ["[Bob] at the beach", "[Bob] in a cafe", "[Bob] on a bus"]
    _, plain = run_story(pipe, chars, panels, 0, 2, 32, sample_rate=0.0)
    base = feature_similarity(plain["attention"])
    for mode in ("batch", "bank"):
        _, csa = run_story(pipe, chars, panels, 0, 2, 32, mode=mode, gate=(1.0, 1.0))
        with_ = feature_similarity(csa["attention"])
        # measured (benchmarks/bench_consistent_quality.py, 6 steps): 0.883 -> 0.898 (bank) / 0.911 (batch)
        assert with_ > base + 0.005, (mode, base, with_)
