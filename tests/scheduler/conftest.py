import pytest

from jaxprfaas.scheduler import casestudy


@pytest.fixture(scope="session")
def paper():
    """The paper's case study (configs/case-studies/paper-1t.yaml)."""
    return casestudy.load("paper-1t")
