"""The hypothesis settings profile of the fuzz suite (applied by its tests, not globally).

``OTELWORKER_FUZZ_EXAMPLES`` sets ``max_examples`` per property (default 200). Under
``CI=true`` the run is derandomized (the same examples every time), as hypothesis' own CI
profile does; otherwise each run explores afresh. No example database is kept (nothing is
written outside the work tree's tests); a failure prints a ``@reproduce_failure`` blob and
the failing request's bytes as they went on the wire.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

PROFILE = "otelworker-fuzz"
DEFAULT_EXAMPLES = 200

settings.register_profile(
    PROFILE,
    max_examples=int(os.environ.get("OTELWORKER_FUZZ_EXAMPLES", DEFAULT_EXAMPLES)),
    deadline=None,
    database=None,
    derandomize=os.environ.get("CI", "").lower() == "true",
    print_blob=True,
    # No explain phase: it re-runs the failing example many times over, and each run of
    # one that stalls the connection costs the stall timeout.
    phases=[phase for phase in Phase if phase is not Phase.explain],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
