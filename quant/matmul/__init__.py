"""The quantized matmul. Imports go one way: reference (plain PyTorch, every mode) -> registry
(which backend runs a call) -> op (the torch.library ops) -> linear (`quantized_linear`, the entry
point); backends/ holds one module per backend family, imported lazily by the registry."""
