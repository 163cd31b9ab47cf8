"""fedsim.testing.check_method (the contract users run on their own methods) holds for every built-in method, so a
user method that passes it meets what the built-ins are tested for."""

from __future__ import annotations

import pytest

from fedsim.methods.base import available_methods, get_method
from fedsim.testing import check_method


@pytest.mark.parametrize("name", available_methods())
def test_check_method_passes_on_every_registered_method(name):
    check_method(get_method(name))
