"""Benchmark helpers shared by the scripts under scripts/: one timer (`timing`), the machine's
peaks and CPU (`peaks`), the FLOP and byte models (`flops`), random full-size weights (`weights`),
the same weights in every implementation (`peers`), process memory (`memory`), timing generate
(`generation`), the JSON records (`records`), the rows of scripts/bench.py (`suite`), the phases
of scripts/bench_20b.py (`full_size`), and the piece-by-piece timing of the profile scripts
(`pieces`, with the pieces of a prefill or training step in `prefill_pieces` and of a decode step
in `decode_pieces`). The scripts parse arguments, pick the rows and print."""
