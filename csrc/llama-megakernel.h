/* C API of the llama-megakernel plugin, for the Python bridge (cffi) and for tools.
 *
 * The plugin is a ggml backend library: ggml_backend_init() returns its registry (and installs the
 * interception of the CPU and CUDA backends), so stock llama.cpp tools load it through GGML_BACKEND_PATH.
 * These functions are also reachable through the registry's get_proc_address under the same names.
 * Structured answers are JSON text, so the interface stays a handful of plain C functions.
 * Keep the declarations below free of preprocessor lines: the bridge hands them to cffi as they are.
 */
#ifndef LLAMA_MEGAKERNEL_H
#define LLAMA_MEGAKERNEL_H
#include <stddef.h>
#ifdef __cplusplus
extern "C" {
#endif
/* cffi-begin */
int          llama_mk_api_version(void);
const char * llama_mk_info_json(void);
int          llama_mk_install(void);
void         llama_mk_set_enabled(int enabled);
int          llama_mk_get_enabled(void);
size_t       llama_mk_status_json(char * buf, size_t size);
void         llama_mk_reset_counters(void);
void         llama_mk_set_cpu_executor(int mode);  /* 0 off, 1 on, 2 auto (pick the faster path per model) */
int          llama_mk_get_cpu_executor(void);
void         llama_mk_set_gpu_executor(int mode);
int          llama_mk_get_gpu_executor(void);
void         llama_mk_set_shuffle_seed(long long seed);
size_t       llama_mk_explain_json(char * buf, size_t size);
int          llama_mk_dequantize(int type, const void * src, long long n, float * dst);
size_t       llama_mk_op_test(const char * what, int wtype, int flash_attn, int n_kv, int seed, char * out, size_t size);
double       llama_mk_copy_bandwidth_gbs(int device);
size_t       llama_mk_supported_json(char * buf, size_t size);
void         llama_mk_note_model_arch(const char * arch);
/* cffi-end */
#ifdef __cplusplus
}
#endif
#endif
