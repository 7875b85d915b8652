"""normbench's C kernels (an LSTM step with norms inside, ghost batch norm): sources, and `build`,
which compiles them once per machine and loads them; callers fall back to PyTorch without them."""
