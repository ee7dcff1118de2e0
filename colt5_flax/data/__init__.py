"""Data: seqio tasks (SCROLLS, UL2 and PEGASUS pretraining, the synthetic retrieval task),
the SCROLLS metrics and submission files, and the vocabularies.

Importing `colt5_flax.data.tasks` registers every task of the project (gin files do:
`import colt5_flax.data.tasks`); see `tasks` for their names. The package itself, the
metrics, SCROLLS, UL2 and PEGASUS modules register nothing when imported. Registration
reads no file and touches no network.
"""
