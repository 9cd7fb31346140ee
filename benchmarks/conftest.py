"""pytest-benchmark files reuse the `turbotune bench` suites, so both report the same cases.

Run: ``python -m pytest benchmarks/bench_layer_norm.py --benchmark-only`` (add
``--quick`` for the small subset)."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False, help="run the quick subset of each suite")


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def suite_cases(name, quick):
    from turbotune.bench import all_suites

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return list(all_suites()[name](quick, device))


def case_id(case):
    return f"{case.op}-{case.provider}-{case.mode}-{case.shape}-{case.dtype}"


def pytest_generate_tests(metafunc):
    # Files that name their suite (SUITE = "...") get one test per case of it;
    # files that parametrize "case" themselves are left alone.
    name = getattr(metafunc.module, "SUITE", None)
    if name is not None and "case" in metafunc.fixturenames:
        cases = suite_cases(name, metafunc.config.getoption("--quick"))
        metafunc.parametrize("case", cases, ids=[case_id(c) for c in cases])
