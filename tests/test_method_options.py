"""Method configs reject bad backend/strategy names when built (not at the first forward inside a model)."""
import pytest

from visattn.methods import BiLevelRouting, Consistent, Neighborhood


@pytest.mark.parametrize("build", [
    lambda: Neighborhood(kernel_size=3, backend="trion"),
    lambda: BiLevelRouting(num_regions=2, topk=1, backend="cuda"),
    lambda: Consistent(backend="fast"),
])
def test_unknown_backend_names_the_parameter_and_choices(build):
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'sdpa'"):
        build()


def test_unknown_routing_strategy_lists_choices():
    with pytest.raises(ValueError, match="strategy must be one of"):
        BiLevelRouting(num_regions=2, topk=1, strategy="gather")


def test_known_backends_are_accepted():
    assert Neighborhood(kernel_size=3, backend="sdpa").backend == "sdpa"
    assert BiLevelRouting(num_regions=2, topk=1, backend="triton").backend == "triton"
