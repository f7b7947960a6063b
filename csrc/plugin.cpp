// The ggml backend plugin: registry, interception of the compute backends, counters.
//
// Two routes to the graphs, chosen per backend when the plugin is initialised:
// - hook (patched llama.cpp, patches/): ggml-cuda calls the plugin at the start of every graph computation,
//   found through the CUDA registry's get_proc_address ("ggml_backend_cuda_set_graph_compute_hook").
// - interception (stock builds, and the CPU backend always): wrap `init_backend` of every device, so each backend
//   created afterwards has its `graph_compute` routed here first. The device and backend interface tables are
//   plain writable structs in ggml (ggml-backend-impl.h); this must happen before llama.cpp creates its context,
//   which both GGML_BACKEND_PATH (tools) and the Python bridge ensure.
// Either way a graph the plugin does not take goes to the stock code unchanged, with the reason counted.
// LLAMA_MEGAKERNEL_ROUTE=intercept forces interception where the hook exists (to compare the two).

#include "llama-megakernel.h"

#include "compiler.h"
#include "cpu-executor.h"
#include "gpu-executor.h"
#include "graph-scan.h"
#include "json.h"
#include "path-choice.h"
#include "quants.h"
#include "version.h"

#include "ggml-backend-impl.h"
#include "ggml-backend.h"
#include "ggml-impl.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace mk {
std::string cuda_devices_json();  // cuda/device-info.cu, or "null" in CPU-only builds
double copy_bandwidth_gbs(int device);  // the same; -1 without CUDA
}

namespace {

using init_backend_fn  = ggml_backend_t (*)(ggml_backend_dev_t, const char *);
using graph_compute_fn = ggml_status (*)(ggml_backend_t, ggml_cgraph *);
using backend_free_fn  = void (*)(ggml_backend_t);

using cuda_hook_fn     = bool (*)(ggml_backend_t, ggml_cgraph *, void * stream, void * user_data);
using set_cuda_hook_fn = void (*)(cuda_hook_fn, void *);

struct gpu_program_free {
    void operator()(mk::gpu_program * g) const { mk::gpu_free(g); }
};

struct wrapped_backend {
    graph_compute_fn orig_compute = nullptr;  // interception route only
    backend_free_fn  orig_free    = nullptr;
    std::string      device;
    bool             is_cpu = false;
    int              cuda_device = -1;  // CUDA backends: the device index (from the name, "CUDA<n>")
    uint64_t         last_uid = 0;  // scan and program are cached per split uid: a reused graph is not redone
    mk::graph_scan   last_scan;
    std::unique_ptr<mk::program> prog;  // the compiled program of that graph, if it compiled
    mk::cpu_executor cpu;
    std::unique_ptr<mk::gpu_program, gpu_program_free> gpu;  // that program on the GPU
    uint64_t         executed = 0;  // graphs this backend's executor computed
    std::string      model_key;     // of its program: the model on this device (the auto mode's choices are per model)
};

int cuda_device_of(const std::string & name) {
    return name.compare(0, 4, "CUDA") == 0 && name.size() > 4 && isdigit((unsigned char) name[4]) ? atoi(name.c_str() + 4) : -1;
}

struct graph_record {  // one distinct graph the plugin saw, for doctor/status
    std::string backend;
    mk::graph_scan scan;
    uint64_t calls = 0;
};

struct state {
    std::mutex mu;
    std::map<ggml_backend_dev_t, init_backend_fn> devices;         // intercepted devices
    std::unordered_map<ggml_backend_t, wrapped_backend> backends;  // backends whose graphs reach the plugin
    std::map<std::string, std::string> routes;                     // registry -> "hook" or "intercept"

    std::atomic<bool> enabled{true};
    // Run programs on CPU backends (tests, debugging): LLAMA_MEGAKERNEL_CPU=1, or auto (path-choice.h).
    std::atomic<mk::exec_mode> cpu_mode{mk::exec_mode::off};
    // Run programs on CUDA backends. Off by default while the executor is slower than stock llama.cpp on some models
    // (docs/gpu-executor-notes.md); LLAMA_MEGAKERNEL_GPU=1 turns it on, LLAMA_MEGAKERNEL_GPU=auto measures both
    // paths on each model's first decode tokens and keeps the faster.
    std::atomic<mk::exec_mode> gpu_mode{mk::exec_mode::off};
    std::map<std::string, mk::path_choice> choices;  // auto mode: per model key (wrapped_backend::model_key)
    void * (*cuda_get_stream)(ggml_backend_t) = nullptr;  // patched ggml-cuda's stream getter, if any
    uint64_t gpu_steps = 0, gpu_failures = 0;
    uint64_t gpu_loads = 0, planar_bytes = 0;  // programs put on a GPU; planar weight bytes of the last one
    double gpu_load_ms = 0;                    // their total time (planar copies included)
    // Host wall time per executed GPU step: in the plugin's hook, over the steps that neither scanned a new graph
    // nor put a program on the GPU (those take milliseconds once), and in gpu_run (launch and the wait for the
    // step's end). LLAMA_MEGAKERNEL_TIMING=1 also times the kernel with CUDA events, so that what a token spends
    // outside the kernel can be told from the tools' tokens per second.
    bool gpu_timing = false;
    double gpu_hook_ms = 0, gpu_run_ms = 0, gpu_kernel_ms = 0;
    uint64_t gpu_hook_steps = 0, gpu_timed_steps = 0;
    std::string last_gpu_error;
    long long shuffle_seed = -1;            // CPU executor: canonical tile order (-1) or a random valid one
    std::string last_explain = "null";      // explain_json of the last program compiled
    uint64_t graphs_seen = 0, graphs_handled = 0, graphs_handed_back = 0, decode_graphs_seen = 0;
    uint64_t programs_compiled = 0;
    uint64_t graphs_while_disabled = 0;
    std::map<std::string, uint64_t> reasons;
    std::deque<graph_record> last_graphs;  // newest last
    std::string model_arch;                // of the last model the bridge saw loaded ("": unknown)
};

state & st() {
    static state * s = new state();  // never destroyed: backends may outlive static destruction order
    return *s;
}

constexpr size_t k_last_graphs = 8;

void record(const std::string & backend, const mk::graph_scan & scan, bool new_graph, bool handled) {
    state & s = st();
    s.graphs_seen++;
    if (scan.decode) {
        s.decode_graphs_seen++;
    }
    if (handled) {
        s.graphs_handled++;
        s.reasons["executed"]++;
    } else {
        s.graphs_handed_back++;
        s.reasons[scan.reason]++;
    }
    if (new_graph || s.last_graphs.empty() || s.last_graphs.back().backend != backend ||
        s.last_graphs.back().scan.uid != scan.uid || scan.uid == 0) {
        s.last_graphs.push_back({backend, scan, 0});
        while (s.last_graphs.size() > k_last_graphs) {
            s.last_graphs.pop_front();
        }
    }
    graph_record & r = s.last_graphs.back();
    r.calls++;
    r.scan.reason = scan.reason;  // the latest verdict: the auto mode's changes after its first calls
    r.scan.detail = scan.detail;
}

mk::target target_for(const wrapped_backend & wb) {
    mk::target t;
    std::string err;
    if (wb.cuda_device >= 0 && !mk::gpu_target(wb.cuda_device, t, err)) {
        t = mk::target{};
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_TARGET_SMS")) {  // size the tiling for another GPU
        t.n_sm = std::max(1, atoi(e));
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_FUSE_DOWN")) {
        t.fuse_down = atoi(e) != 0;
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_ROPE_PAIRS")) {
        t.rope_pairs = std::min(2, std::max(0, atoi(e)));
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_FOLD_NORMS")) {
        t.fold_norms = atoi(e) != 0;
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_DEFER_QK")) {
        t.defer_qk = atoi(e) != 0;
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_ATTN_MERGE")) {
        t.attn_merge = atoi(e) != 0;
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_ATTN_MIN_CELLS")) {
        t.attn_min_cells = std::max(1, atoi(e));
    }
    return t;
}

// The model a program computes, on its device: the addresses of its first and last weights, and its size. The same
// model gives the same key after every graph rebuild; another model loaded later at the same addresses may inherit a
// choice of path (a speed choice only: both paths compute the same step).
std::string model_key(const wrapped_backend & wb, const mk::program & p) {
    uint64_t first = 0, last = 0;
    for (const mk::instruction & in : p.instrs) {
        for (int k = 0; k < in.n_segments; k++) {
            if (in.seg[k].constant && !in.seg[k].w.scratch) {
                first = first ? first : in.seg[k].w.off;
                last = in.seg[k].w.off;
            }
        }
    }
    char b[96];
    snprintf(b, sizeof b, "%llx-%llx-%zu", (unsigned long long) first, (unsigned long long) last, p.instrs.size());
    return wb.device + ":" + b;
}

// Scan a new graph and compile it if the scan found nothing unsupported. Called with s.mu held.
void prepare(state & s, wrapped_backend & wb, ggml_cgraph * graph) {
    wb.gpu.reset();
    wb.prog.reset();
    wb.cpu.prog = nullptr;  // fresh counters for the next program
    try {
        wb.last_scan = mk::scan_graph(graph);
    } catch (const std::exception & e) {
        wb.last_scan = mk::graph_scan{};
        wb.last_scan.reason = "internal-error";
        wb.last_scan.detail = e.what();
    }
    wb.last_uid = graph->uid;
    if (const char * path = getenv("LLAMA_MEGAKERNEL_DUMP_GRAPH"); path && wb.last_scan.decode) {
        if (FILE * f = fopen(path, "a")) {
            fprintf(f, "# %s graph uid %llu, %d nodes\n%s", wb.device.c_str(), (unsigned long long) graph->uid,
                    graph->n_nodes, mk::dump_graph(graph).c_str());
            fclose(f);
        }
    }
    if (wb.last_scan.supported) {
        try {
            wb.prog.reset(new mk::program(mk::compile(graph, target_for(wb))));
            s.programs_compiled++;
            s.last_explain = mk::explain_json(*wb.prog);
            wb.model_key = model_key(wb, *wb.prog);
        } catch (const mk::compile_error & e) {
            wb.last_scan.supported = false;
            wb.last_scan.reason = e.reason;
            wb.last_scan.detail = e.what();
        } catch (const std::exception & e) {
            wb.last_scan.supported = false;
            wb.last_scan.reason = "internal-error";
            wb.last_scan.detail = std::string("compiler: ") + e.what();
        }
    }
    const std::string & r = wb.last_scan.reason;
    if (wb.last_scan.decode && !wb.last_scan.supported && !s.model_arch.empty() &&
        !mk::architecture_supported(s.model_arch) && r.compare(0, 12, "unsupported-") == 0) {
        wb.last_scan.reason = "unsupported-architecture";
        wb.last_scan.detail = "model architecture " + s.model_arch + " (the last model loaded) is not supported: " +
                              wb.last_scan.detail;
    }
}

// The auto mode's verdict for a graph it hands to stock (measuring, or stock measured faster).
void auto_declined(mk::graph_scan & sc, const mk::path_choice & pc, const char * var) {
    if (pc.decided < 0) {
        sc.reason = "auto-measuring";
        sc.detail = std::string(var) + "=auto: timing stock on this token (the paths alternate)";
    } else {
        sc.reason = "auto-stock";
        sc.detail = std::string(var) + "=auto chose stock, " + pc.why;
    }
}

// Run the compiled program of a graph on this backend's executor, if `want`; true if it did. With s.mu held.
bool run_program(state & s, wrapped_backend & wb, ggml_backend_t backend, bool new_graph, bool want,
                 const mk::path_choice * pc, std::chrono::steady_clock::time_point t_hook, void * stream_) {
    mk::graph_scan & sc = wb.last_scan;
    if (wb.prog && wb.is_cpu) {
        if (s.cpu_mode.load() == mk::exec_mode::off) {
            sc.reason = "no-executor";
            sc.detail = "compiled; the CPU executor is off (LLAMA_MEGAKERNEL_CPU=1 turns it on)";
        } else if (!want && pc) {
            auto_declined(sc, *pc, "LLAMA_MEGAKERNEL_CPU");
        } else if (!sc.weights_on_host) {
            // ggml-cpu repacks Q4_0/Q4_K into a layout of its own unless told not to before the model loads
            sc.reason = "weights-not-host";
            sc.detail = "weights in a repacked or device buffer; enable the CPU executor before loading the model";
        } else {
            try {
                wb.cpu.run(*wb.prog, s.shuffle_seed);
                sc.reason = "executed";
                sc.detail = "compiled to " + std::to_string(wb.prog->instrs.size()) + " instructions; run by the CPU executor";
                wb.executed++;
                record(wb.device, sc, new_graph, true);
                return true;
            } catch (const std::exception & e) {
                // nothing is lost: the stock backend recomputes the whole step, KV writes included
                sc.reason = "executor-error";
                sc.detail = e.what();
                wb.prog.reset();
            }
        }
    } else if (wb.prog && wb.cuda_device >= 0 && s.gpu_mode.load() == mk::exec_mode::off) {
        sc.reason = "no-executor";
        sc.detail = "compiled; the GPU executor is off (LLAMA_MEGAKERNEL_GPU=1 turns it on, =auto takes it where it "
                    "measures faster than stock)";
    } else if (wb.prog && wb.cuda_device >= 0 && !want && pc) {
        auto_declined(sc, *pc, "LLAMA_MEGAKERNEL_GPU");
    } else if (wb.prog && wb.cuda_device >= 0) {
        std::string err;
        const bool setup = new_graph || !wb.gpu;
        if (!wb.gpu) {
            const auto t0 = std::chrono::steady_clock::now();
            wb.gpu.reset(mk::gpu_load(*wb.prog, wb.cuda_device, err));
            s.gpu_loads++;
            s.gpu_load_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            s.planar_bytes = mk::gpu_planar_bytes(wb.gpu.get());
            if (!wb.gpu) {
                sc.reason = "gpu-refused";
                sc.detail = err;
                wb.prog.reset();  // this graph stays on the stock path
            }
        }
        if (wb.gpu) {
            void * stream = stream_ != nullptr ? stream_ : (s.cuda_get_stream ? s.cuda_get_stream(backend) : nullptr);
            float kernel_ms = -1.0f;
            const auto t_run = std::chrono::steady_clock::now();
            const bool ran = mk::gpu_run(wb.gpu.get(), stream, err, s.gpu_timing ? &kernel_ms : nullptr);
            const auto t_end = std::chrono::steady_clock::now();
            if (ran) {
                s.gpu_steps++;
                wb.executed++;
                s.gpu_run_ms += std::chrono::duration<double, std::milli>(t_end - t_run).count();
                if (!setup) {
                    s.gpu_hook_ms += std::chrono::duration<double, std::milli>(t_end - t_hook).count();
                    s.gpu_hook_steps++;
                }
                if (kernel_ms >= 0.0f) {
                    s.gpu_kernel_ms += kernel_ms;
                    s.gpu_timed_steps++;
                }
                sc.reason = "executed";
                sc.detail = "compiled to " + std::to_string(wb.prog->instrs.size()) + " instructions; one launch on " + wb.device;
                record(wb.device, sc, new_graph, true);
                return true;
            }
            // nothing is lost: the stock backend recomputes the whole step, KV writes included
            s.gpu_failures++;
            s.last_gpu_error = err;
            GGML_LOG_WARN("llama-megakernel: %s; this graph goes back to the stock path\n", err.c_str());
            sc.reason = "gpu-error";
            sc.detail = err;
            wb.gpu.reset();
            wb.prog.reset();
        }
    } else if (wb.prog) {
        sc.reason = "no-executor";
        sc.detail = "compiled; no executor for this backend";
    }
    record(wb.device, sc, new_graph, false);
    return false;
}

// Decide for one graph; true if the plugin computed it. Called with s.mu held.
bool take_graph(state & s, wrapped_backend & wb, ggml_backend_t backend, ggml_cgraph * graph, void * stream_) {
    const auto t_hook = std::chrono::steady_clock::now();
    if (!s.enabled.load()) {
        s.graphs_while_disabled++;
        return false;
    }
    const bool new_graph = graph->uid == 0 || graph->uid != wb.last_uid;
    if (new_graph) {
        prepare(s, wb, graph);
    }
    const bool has_executor = wb.is_cpu || wb.cuda_device >= 0;
    const mk::exec_mode mode = wb.is_cpu ? s.cpu_mode.load() : s.gpu_mode.load();
    mk::path_choice * pc = nullptr;
    if (wb.prog && has_executor && mode == mk::exec_mode::autopick) {
        pc = &s.choices[wb.model_key];
        if (new_graph) {
            pc->new_program();
        }
    }
    const bool want = mode == mk::exec_mode::on || (pc && pc->pick(t_hook) == mk::path_choice::executor);
    const bool ran = run_program(s, wb, backend, new_graph, want, pc, t_hook, stream_);
    if (pc) {
        pc->ran(ran ? mk::path_choice::executor : mk::path_choice::stock, t_hook);
        if (pc->decided == mk::path_choice::stock && wb.gpu) {
            wb.gpu.reset();  // stock won: give back the program's GPU memory (its planar copies)
        }
    }
    return ran;
}

ggml_status mk_graph_compute(ggml_backend_t backend, ggml_cgraph * graph) {
    state & s = st();
    graph_compute_fn orig;
    {
        std::lock_guard<std::mutex> lock(s.mu);
        auto it = s.backends.find(backend);
        if (it == s.backends.end() || it->second.orig_compute == nullptr) {
            // Cannot happen: only backends we wrapped point here. Refuse rather than guess a function.
            GGML_LOG_ERROR("llama-megakernel: graph_compute on a backend it did not wrap\n");
            return GGML_STATUS_FAILED;
        }
        orig = it->second.orig_compute;
        if (take_graph(s, it->second, backend, graph, nullptr)) {
            return GGML_STATUS_SUCCESS;
        }
    }
    return orig(backend, graph);
}

bool mk_cuda_hook(ggml_backend_t backend, ggml_cgraph * graph, void * stream, void * /*user_data*/) {
    state & s = st();
    std::lock_guard<std::mutex> lock(s.mu);
    wrapped_backend & wb = s.backends[backend];  // created on first use; the hook route never frees it
    if (wb.device.empty()) {
        wb.device = ggml_backend_name(backend);
        wb.cuda_device = cuda_device_of(wb.device);
    }
    return take_graph(s, wb, backend, graph, stream);
}

void mk_backend_free(ggml_backend_t backend) {
    state & s = st();
    backend_free_fn orig = nullptr;
    {
        std::lock_guard<std::mutex> lock(s.mu);
        auto it = s.backends.find(backend);
        if (it != s.backends.end()) {
            orig = it->second.orig_free;
            s.backends.erase(it);
        }
    }
    if (orig) {
        orig(backend);
    }
}

ggml_backend_t mk_init_backend(ggml_backend_dev_t dev, const char * params) {
    state & s = st();
    init_backend_fn orig;
    {
        std::lock_guard<std::mutex> lock(s.mu);
        auto it = s.devices.find(dev);
        if (it == s.devices.end()) {  // only devices we wrapped point here; refuse rather than guess
            GGML_LOG_ERROR("llama-megakernel: init_backend on a device it did not wrap\n");
            return nullptr;
        }
        orig = it->second;
    }
    ggml_backend_t backend = orig(dev, params);
    if (backend == nullptr || backend->iface.graph_compute == nullptr) {
        return backend;
    }
    std::lock_guard<std::mutex> lock(s.mu);
    wrapped_backend wb;
    wb.orig_compute = backend->iface.graph_compute;
    wb.orig_free    = backend->iface.free;
    wb.device       = ggml_backend_dev_name(dev);
    wb.is_cpu       = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
    wb.cuda_device  = cuda_device_of(wb.device);
    s.backends[backend] = std::move(wb);
    backend->iface.graph_compute = mk_graph_compute;
    backend->iface.free          = mk_backend_free;
    return backend;
}

// LLAMA_MEGAKERNEL_STATUS_FILE=path: write the counters there when the process exits, so that stock tools
// (llama-bench, llama-cli), which know nothing of the plugin, can still show what it did.
void write_status_file() {
    const char * path = getenv("LLAMA_MEGAKERNEL_STATUS_FILE");
    if (path == nullptr || *path == '\0') {
        return;
    }
    std::vector<char> buf(llama_mk_status_json(nullptr, 0) + 4096);
    llama_mk_status_json(buf.data(), buf.size());
    if (FILE * f = fopen(path, "w")) {
        fputs(buf.data(), f);
        fputc('\n', f);
        fclose(f);
    } else {
        fprintf(stderr, "llama-megakernel: cannot write LLAMA_MEGAKERNEL_STATUS_FILE=%s\n", path);
    }
}

// While the CPU executor is on, models loaded afterwards keep their weights in the GGUF layout: ggml-cpu's
// repacked buffer types (found through this proc address) are hidden from llama.cpp.
using get_proc_fn = void * (*)(ggml_backend_reg_t, const char *);
get_proc_fn g_cpu_get_proc = nullptr;

void * cpu_get_proc_address(ggml_backend_reg_t reg, const char * name) {
    if (st().cpu_mode.load() != mk::exec_mode::off && strcmp(name, "ggml_backend_dev_get_extra_bufts") == 0) {
        return nullptr;
    }
    return g_cpu_get_proc(reg, name);
}

int install() {
    static std::once_flag at_exit;
    std::call_once(at_exit, [] { atexit(write_status_file); });
    state & s = st();
    std::lock_guard<std::mutex> lock(s.mu);
    const char * route_env = getenv("LLAMA_MEGAKERNEL_ROUTE");
    const bool force_intercept = route_env && std::string(route_env) == "intercept";
    if (const char * e = getenv("LLAMA_MEGAKERNEL_CPU")) {
        s.cpu_mode.store(mk::parse_exec_mode(e));
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_GPU")) {
        s.gpu_mode.store(mk::parse_exec_mode(e));
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_TIMING")) {
        s.gpu_timing = atoi(e) != 0;
    }
    if (const char * e = getenv("LLAMA_MEGAKERNEL_SHUFFLE")) {
        s.shuffle_seed = atoll(e);
    }
    for (const char * reg_name : {"CUDA", "CPU"}) {
        ggml_backend_reg_t reg = ggml_backend_reg_by_name(reg_name);
        if (reg == nullptr || s.routes.count(reg_name)) {
            continue;
        }
        if (std::string(reg_name) == "CUDA") {
            s.cuda_get_stream = (void * (*)(ggml_backend_t)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cuda_get_stream");
        }
        auto set_hook = (set_cuda_hook_fn) ggml_backend_reg_get_proc_address(
            reg, "ggml_backend_cuda_set_graph_compute_hook");
        if (set_hook != nullptr && !force_intercept) {
            set_hook(mk_cuda_hook, nullptr);
            s.routes[reg_name] = "hook";
            continue;
        }
        s.routes[reg_name] = "intercept";
        if (std::string(reg_name) == "CPU" && g_cpu_get_proc == nullptr && reg->iface.get_proc_address) {
            g_cpu_get_proc = reg->iface.get_proc_address;
            reg->iface.get_proc_address = cpu_get_proc_address;
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); i++) {
            ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, i);
            if (s.devices.count(dev) || dev->iface.init_backend == nullptr) {
                continue;
            }
            s.devices[dev] = dev->iface.init_backend;
            dev->iface.init_backend = mk_init_backend;
        }
    }
    return (int) s.routes.size();
}

// --- registry ---------------------------------------------------------------------------------------------

const char * reg_get_name(ggml_backend_reg_t) { return "MEGAKERNEL"; }
size_t reg_get_device_count(ggml_backend_reg_t) { return 0; }  // it runs on the devices it intercepts
ggml_backend_dev_t reg_get_device(ggml_backend_reg_t, size_t) { return nullptr; }

void * reg_get_proc_address(ggml_backend_reg_t, const char * name) {
    static const std::map<std::string, void *> procs = {
        {"llama_mk_api_version", (void *) llama_mk_api_version},
        {"llama_mk_info_json", (void *) llama_mk_info_json},
        {"llama_mk_install", (void *) llama_mk_install},
        {"llama_mk_set_enabled", (void *) llama_mk_set_enabled},
        {"llama_mk_get_enabled", (void *) llama_mk_get_enabled},
        {"llama_mk_status_json", (void *) llama_mk_status_json},
        {"llama_mk_reset_counters", (void *) llama_mk_reset_counters},
        {"llama_mk_set_cpu_executor", (void *) llama_mk_set_cpu_executor},
        {"llama_mk_get_cpu_executor", (void *) llama_mk_get_cpu_executor},
        {"llama_mk_set_gpu_executor", (void *) llama_mk_set_gpu_executor},
        {"llama_mk_get_gpu_executor", (void *) llama_mk_get_gpu_executor},
        {"llama_mk_set_shuffle_seed", (void *) llama_mk_set_shuffle_seed},
        {"llama_mk_explain_json", (void *) llama_mk_explain_json},
        {"llama_mk_dequantize", (void *) llama_mk_dequantize},
        {"llama_mk_copy_bandwidth_gbs", (void *) llama_mk_copy_bandwidth_gbs},
    };
    auto it = procs.find(name);
    return it == procs.end() ? nullptr : it->second;
}

ggml_backend_reg g_reg = {
    /* .api_version = */ GGML_BACKEND_API_VERSION,
    /* .iface       = */ {reg_get_name, reg_get_device_count, reg_get_device, reg_get_proc_address},
    /* .context     = */ nullptr,
};

// A mean in microseconds from a total in milliseconds, or null when nothing was counted.
std::string per_step(double total_ms, uint64_t n) {
    if (n == 0) {
        return "null";
    }
    char b[32];
    snprintf(b, sizeof b, "%.1f", 1e3 * total_ms / (double) n);
    return b;
}

}  // namespace

// --- exported ---------------------------------------------------------------------------------------------

#pragma GCC visibility push(default)
extern "C" {

GGML_BACKEND_API ggml_backend_reg_t ggml_backend_init(void) {
    install();
    return &g_reg;
}

// Non-zero: ggml rejects a plugin whose score is 0. The plugin works wherever ggml runs (it hands back what it
// cannot execute), so it always scores the same.
GGML_BACKEND_API int ggml_backend_score(void) {
    return 1;
}

int llama_mk_api_version(void) {
    return 1;
}

const char * llama_mk_info_json(void) {
    static const std::string info = std::string("{") +
        "\"api_version\":" + std::to_string(llama_mk_api_version()) +
        ",\"plugin_version\":" + mk::json_str(LLAMA_MK_VERSION) +
        ",\"git_commit\":" + mk::json_str(LLAMA_MK_GIT_COMMIT) +
        ",\"built_against_llama_cpp\":" + mk::json_str(LLAMA_MK_LLAMA_CPP_COMMIT) +
        ",\"built_against_ggml\":" + mk::json_str(LLAMA_MK_GGML_VERSION) +
        ",\"ggml_runtime\":" + mk::json_str(ggml_version()) +
        ",\"cuda_compiled\":" + (LLAMA_MK_CUDA ? "true" : "false") +
        ",\"cuda_architectures\":" + mk::json_str(LLAMA_MK_CUDA_ARCHS) +
        ",\"cuda_devices\":" + mk::cuda_devices_json() + "}";
    return info.c_str();
}

int llama_mk_install(void) {
    return install();
}

void llama_mk_set_enabled(int enabled) {
    st().enabled.store(enabled != 0);
}

int llama_mk_get_enabled(void) {
    return st().enabled.load() ? 1 : 0;
}

size_t llama_mk_status_json(char * buf, size_t size) {
    state & s = st();
    std::string o;
    {
        std::lock_guard<std::mutex> lock(s.mu);
        std::map<std::string, int> devices;
        for (auto & d : s.devices) {
            devices[ggml_backend_dev_name(d.first)] = 1;
        }
        std::string dev_list = "[";
        for (auto it = devices.begin(); it != devices.end(); ++it) {
            dev_list += (it == devices.begin() ? "" : ",") + mk::json_str(it->first);
        }
        dev_list += "]";
        std::string last = "[";
        for (size_t i = 0; i < s.last_graphs.size(); i++) {
            const graph_record & r = s.last_graphs[i];
            last += (i ? "," : "") + std::string("{\"backend\":") + mk::json_str(r.backend) +
                    ",\"calls\":" + std::to_string(r.calls) + ",\"scan\":" + mk::to_json(r.scan) + "}";
        }
        last += "]";
        // per backend, in a fixed order: which device it is, and its own program and executed graphs
        std::vector<std::string> bes;
        for (const auto & b : s.backends) {
            const wrapped_backend & wb = b.second;
            bes.push_back(std::string("{\"device\":") + mk::json_str(wb.device) +
                          ",\"cuda_device\":" + std::to_string(wb.cuda_device) +
                          ",\"route\":\"" + (wb.orig_compute ? "intercept" : "hook") + "\"" +
                          ",\"program_instructions\":" + std::to_string(wb.prog ? wb.prog->instrs.size() : 0) +
                          ",\"on_gpu\":" + (wb.gpu ? "true" : "false") +
                          ",\"executed\":" + std::to_string(wb.executed) + "}");
        }
        std::sort(bes.begin(), bes.end());
        std::string choices = "[";  // the auto mode's, per model
        for (const auto & c : s.choices) {
            const mk::path_choice & pc = c.second;
            char med[96];
            snprintf(med, sizeof med, ",\"executor_us\":%.1f,\"stock_us\":%.1f,\"samples\":[%zu,%zu]",
                     pc.median_us[mk::path_choice::executor], pc.median_us[mk::path_choice::stock],
                     pc.us[mk::path_choice::executor].size(), pc.us[mk::path_choice::stock].size());
            choices += (choices.size() > 1 ? "," : "") + std::string("{\"model\":") + mk::json_str(c.first) +
                       ",\"choice\":" + mk::json_str(pc.state()) + ",\"why\":" + mk::json_str(pc.why) +
                       ",\"calls\":" + std::to_string(pc.calls) + med + "}";
        }
        choices += "]";
        std::string backends = "[";
        for (size_t i = 0; i < bes.size(); i++) {
            backends += (i ? "," : "") + bes[i];
        }
        backends += "]";
        o = std::string("{") +
            "\"enabled\":" + (s.enabled.load() ? "true" : "false") +
            ",\"intercepted_devices\":" + dev_list +
            ",\"routes\":" + mk::json_counts(s.routes) +
            ",\"live_backends\":" + std::to_string(s.backends.size()) +
            ",\"backends\":" + backends +
            ",\"graphs_seen\":" + std::to_string(s.graphs_seen) +
            ",\"graphs_handled\":" + std::to_string(s.graphs_handled) +
            ",\"graphs_handed_back\":" + std::to_string(s.graphs_handed_back) +
            ",\"decode_graphs_seen\":" + std::to_string(s.decode_graphs_seen) +
            ",\"graphs_while_disabled\":" + std::to_string(s.graphs_while_disabled) +
            ",\"programs_compiled\":" + std::to_string(s.programs_compiled) +
            ",\"cpu_executor\":" + (s.cpu_mode.load() != mk::exec_mode::off ? "true" : "false") +
            ",\"gpu_executor\":" + (s.gpu_mode.load() != mk::exec_mode::off ? "true" : "false") +
            ",\"cpu_mode\":" + mk::json_str(mk::exec_mode_name(s.cpu_mode.load())) +
            ",\"gpu_mode\":" + mk::json_str(mk::exec_mode_name(s.gpu_mode.load())) +
            ",\"auto_choices\":" + choices +
            ",\"gpu_steps\":" + std::to_string(s.gpu_steps) +
            ",\"gpu_failures\":" + std::to_string(s.gpu_failures) +
            ",\"last_gpu_error\":" + mk::json_str(s.last_gpu_error) +
            ",\"gpu_loads\":" + std::to_string(s.gpu_loads) +
            ",\"gpu_load_ms\":" + std::to_string(s.gpu_load_ms) +
            ",\"planar_bytes\":" + std::to_string(s.planar_bytes) +
            ",\"gpu_hook_us_per_step\":" + per_step(s.gpu_hook_ms, s.gpu_hook_steps) +
            ",\"gpu_run_us_per_step\":" + per_step(s.gpu_run_ms, s.gpu_steps) +
            ",\"gpu_kernel_us_per_step\":" + per_step(s.gpu_kernel_ms, s.gpu_timed_steps) +
            ",\"shuffle_seed\":" + std::to_string(s.shuffle_seed) +
            ",\"reasons\":" + mk::json_counts(s.reasons) +
            ",\"last_graphs\":" + last + "}";
    }
    return mk::copy_out(o, buf, size);
}

void llama_mk_reset_counters(void) {
    state & s = st();
    std::lock_guard<std::mutex> lock(s.mu);
    s.graphs_seen = s.graphs_handled = s.graphs_handed_back = s.decode_graphs_seen = s.graphs_while_disabled = 0;
    s.programs_compiled = 0;
    s.gpu_steps = s.gpu_failures = s.gpu_loads = 0;
    s.gpu_load_ms = s.gpu_hook_ms = s.gpu_run_ms = s.gpu_kernel_ms = 0;
    s.gpu_hook_steps = s.gpu_timed_steps = 0;
    s.reasons.clear();
    s.last_graphs.clear();
    s.choices.clear();  // the auto mode measures again
    for (auto & b : s.backends) {
        b.second.last_uid = 0;
        b.second.executed = 0;
    }
}

// 0 off, 1 on, 2 auto (path-choice.h)
static mk::exec_mode mode_of(int m) {
    return m == 2 ? mk::exec_mode::autopick : m != 0 ? mk::exec_mode::on : mk::exec_mode::off;
}
static int int_of(mk::exec_mode m) {
    return m == mk::exec_mode::autopick ? 2 : m == mk::exec_mode::on ? 1 : 0;
}

void llama_mk_set_cpu_executor(int mode) {
    st().cpu_mode.store(mode_of(mode));
}

int llama_mk_get_cpu_executor(void) {
    return int_of(st().cpu_mode.load());
}

void llama_mk_set_gpu_executor(int mode) {
    st().gpu_mode.store(mode_of(mode));
}

int llama_mk_get_gpu_executor(void) {
    return int_of(st().gpu_mode.load());
}

void llama_mk_set_shuffle_seed(long long seed) {
    state & s = st();
    std::lock_guard<std::mutex> lock(s.mu);
    s.shuffle_seed = seed < 0 ? -1 : seed;
}

size_t llama_mk_explain_json(char * buf, size_t size) {
    state & s = st();
    std::string o;
    {
        std::lock_guard<std::mutex> lock(s.mu);
        o = s.last_explain;
    }
    return mk::copy_out(o, buf, size);
}

int llama_mk_dequantize(int type, const void * src, long long n, float * dst) {
    const mk::type_info ti = mk::info_of(type);
    if (ti.block == 0 || n % ti.block != 0) {
        return -1;
    }
    mk::dequant_row(type, src, dst, n);
    return 0;
}

// Device-to-device copy rate of GPU `device` (bytes read + written per second / 1e9), for the bandwidth floor that
// `llama-megakernel bench` reports; -1 without CUDA or on any CUDA error.
double llama_mk_copy_bandwidth_gbs(int device) {
    return mk::copy_bandwidth_gbs(device);
}

size_t llama_mk_supported_json(char * buf, size_t size) {
    return mk::copy_out(mk::supported_json(), buf, size);
}

// The bridge reports the architecture of each model llama-cpp-python loads. A graph knows nothing of its model, so
// this only names the architecture in the reason of graphs that are handed back anyway.
void llama_mk_note_model_arch(const char * arch) {
    state & s = st();
    std::lock_guard<std::mutex> lock(s.mu);
    s.model_arch = arch ? arch : "";
}

}  // extern "C"
#pragma GCC visibility pop
