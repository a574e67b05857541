"""Genomes: what a search varies and how one trial's values become a merge plan.

`protocol.Genome` is what the search loop, the workers and export use of a genome; `kinds` is the
table of genome kinds a space file's `genome.kind` picks from, and `make_genome` the one place a
genome is built.
"""
