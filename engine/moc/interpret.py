"""Running the Triton kernels under the interpreter (TRITON_INTERPRET=1: the CPU, tiny sizes, for
tests and the benchmarks' CPU checks)."""

import contextlib


@contextlib.contextmanager
def interpreter_numpy_shim():
    """Triton 3.6's interpreter turns a loaded scalar into a one-element array and calls int() on it
    for range(); numpy >= 2.3 refuses that ("only 0-dimensional arrays can be converted to Python
    scalars"). Read the element instead, inside this block only."""
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = original
