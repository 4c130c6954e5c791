// The Python module dsq_ext._C, made with the CPython C API (no pybind11).
//
// Importing it loads this shared library, whose static initialisers
// (TORCH_LIBRARY in ops.cpp, TORCH_LIBRARY_IMPL in the backend files) register
// the operators with PyTorch's dispatcher; Python then reaches them as
// torch.ops.dsq_ext.*. The module itself only carries what the build was made
// against, for dsq_ext.build_info(), and the kernels' alpha range.
#include <Python.h>

#include "dsq_math.h"

#ifndef DSQ_TORCH_VERSION
#define DSQ_TORCH_VERSION "unknown"
#endif
#ifndef DSQ_CUDA_VERSION
#define DSQ_CUDA_VERSION ""
#endif

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
    static struct PyModuleDef module_def = {
        PyModuleDef_HEAD_INIT,
        "_C",
        "dsq_ext's compiled operators (registered in torch.ops.dsq_ext on import).",
        -1,
        nullptr,
    };
    PyObject* m = PyModule_Create(&module_def);
    if (m == nullptr) return nullptr;
    // The alpha clamp range of dsq_math.h, so that Python (the report) never restates it.
    if (PyModule_AddStringConstant(m, "torch_version", DSQ_TORCH_VERSION) < 0 ||
        PyModule_AddStringConstant(m, "cuda_version", DSQ_CUDA_VERSION) < 0 ||
        PyModule_AddObject(m, "ALPHA_MIN", PyFloat_FromDouble(DSQ_ALPHA_MIN)) < 0 ||
        PyModule_AddObject(m, "ALPHA_MAX", PyFloat_FromDouble(DSQ_ALPHA_MAX)) < 0 ||
        PyModule_AddObject(m, "K_MAX", PyFloat_FromDouble(DSQ_K_MAX)) < 0) {
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}

}  // extern "C"
