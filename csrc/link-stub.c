/* Empty library that only carries a soname (libggml.so.0 / libggml-base.so.0) for the linker; see
 * CMakeLists.txt. Never installed, never loaded. */
int llama_mk_link_stub;
