"""Benchmark helpers shared by the scripts under scripts/: one timer (`timing`), the machine's
peaks and CPU (`peaks`), the FLOP and byte models (`flops`), random full-size weights (`weights`),
the same weights in every implementation (`peers`), process memory (`memory`), timing generate
(`generation`), the JSON records (`records`) and the rows of scripts/bench.py (`suite`). The
scripts parse arguments, pick the rows and print."""
