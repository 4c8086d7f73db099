"""PERFT on sharded models: the distributed layouts wrap the core block (`peft_perft.layer`), which imports none of
them."""
