"""What a JSON record must carry to be trusted later: the command that produced it, when (UTC),
and on which CPU. Kept for the scripts that import it from here (`parity_report.py`); the code is
`gptoss_jax.bench.records` (and `gptoss_jax.bench.peaks.cpu_info`).

    from provenance import provenance
    record["provenance"] = provenance()
"""

from gptoss_jax.bench.peaks import ISA_FLAGS, cpu_info  # noqa: F401
from gptoss_jax.bench.records import command_line, provenance  # noqa: F401
