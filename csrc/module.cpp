// posattn._C as an importable Python module. The ops register themselves with the
// dispatcher when the library loads (TORCH_LIBRARY in ops.cpp); Python then calls them
// as torch.ops.posattn.<op>. The module itself defines nothing.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "posattn's C++ CPU backend (ops under torch.ops.posattn)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
