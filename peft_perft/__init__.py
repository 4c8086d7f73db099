"""PERFT: Parameter-Efficient Routed Fine-Tuning for Mixture-of-Experts models, as a PEFT method."""
