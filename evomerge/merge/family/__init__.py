"""The merge methods' math, one module per family; each module declares its `MethodSpec`s and
`evomerge/merge/catalogue.py` registers them."""
