// mk-compare: the megakernel against stock llama.cpp in one process, on the same model and context (the plugin is
// loaded through GGML_BACKEND_PATH by the patched llama_backend_init and toggled with llama_mk_set_enabled).
//
//   A  stock, greedy: tokens and logits of every step
//   B  plugin, teacher-forced with A's tokens: per-step logits cosine, max |diff|, top-1 agreement
//   C  plugin, free greedy: tokens identical to A up to which step
//   D  (--cpu-steps K) the CPU executor on the same graphs (model loaded without offload, plugin's CPU executor on),
//      teacher-forced: logits against B, i.e. the GPU executor against the CPU executor
//   E  (--with MODEL2) a second model and context on the same GPU, plugin on: MODEL2 alone, then both contexts
//      decoding in turn, one step each; each must get exactly what it got alone (B for MODEL, E for MODEL2)
//   R  (--ref-cpu K) stock ggml-cpu (model loaded without offload, plugin off), teacher-forced with A's tokens:
//      how far two stock implementations of the same model differ (A against R), beside B against A; then its own
//      greedy run, and for how many steps its tokens equal A's and C's
// Prints one JSON object. Used by scripts/gpu_checks.py on the GPU machine.
//
// Build: g++ -O2 -std=c++17 mk-compare.cpp -I<llama.cpp>/include -I<llama.cpp>/ggml/include -L<bin> -lllama -lggml-base
#include "ggml-backend.h"
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct plugin_api {
    void (*set_enabled)(int) = nullptr;
    void (*set_cpu_executor)(int) = nullptr;
    size_t (*status_json)(char *, size_t) = nullptr;
    void (*reset_counters)(void) = nullptr;
    size_t (*explain_json)(char *, size_t) = nullptr;

    std::string status() const {
        std::vector<char> buf(1 << 20);
        status_json(buf.data(), buf.size());
        return buf.data();
    }
};

[[noreturn]] void die(const std::string & msg) {
    fprintf(stderr, "mk-compare: %s\n", msg.c_str());
    exit(2);
}

struct run_out {
    std::vector<int> tokens;     // token chosen (A, C) or fed (B, D) after each step
    std::vector<float> logits;   // steps x n_vocab
};

int argmax(const float * v, int n) {
    return (int) (std::max_element(v, v + n) - v);
}

// Prefill `prompt`, then `steps` decode steps; logits of step i come from decoding token i-1 (step 0: the prompt's
// last position). forced: feed these tokens instead of the argmax.
run_out run(llama_context * ctx, int n_vocab, const std::vector<llama_token> & prompt, int steps,
            const std::vector<int> * forced, bool keep_logits) {
    llama_memory_clear(llama_get_memory(ctx), true);
    std::vector<llama_token> p = prompt;
    if (llama_decode(ctx, llama_batch_get_one(p.data(), (int32_t) p.size())) != 0) {
        die("prefill failed");
    }
    run_out o;
    for (int i = 0; i <= steps; i++) {
        const float * lg = llama_get_logits_ith(ctx, -1);
        if (lg == nullptr) {
            die("no logits");
        }
        if (i > 0 && keep_logits) {
            o.logits.insert(o.logits.end(), lg, lg + n_vocab);
        }
        if (i == steps) {
            break;
        }
        llama_token t = forced ? (*forced)[i] : argmax(lg, n_vocab);
        o.tokens.push_back(t);
        if (llama_decode(ctx, llama_batch_get_one(&t, 1)) != 0) {
            die("decode failed at step " + std::to_string(i));
        }
    }
    return o;
}

// Two contexts decoding in turn, one step each (teacher-forced with `forced1` / `forced2`), logits kept.
void interleave(llama_context * c1, int nv1, const std::vector<llama_token> & p1, const std::vector<int> & forced1,
                llama_context * c2, int nv2, const std::vector<llama_token> & p2, const std::vector<int> & forced2,
                int steps, run_out & o1, run_out & o2) {
    llama_context * ctx[2] = {c1, c2};
    const int nv[2] = {nv1, nv2};
    const std::vector<llama_token> * pr[2] = {&p1, &p2};
    const std::vector<int> * fo[2] = {&forced1, &forced2};
    run_out * o[2] = {&o1, &o2};
    for (int k = 0; k < 2; k++) {
        llama_memory_clear(llama_get_memory(ctx[k]), true);
        std::vector<llama_token> p = *pr[k];
        if (llama_decode(ctx[k], llama_batch_get_one(p.data(), (int32_t) p.size())) != 0) {
            die("prefill failed (two contexts)");
        }
    }
    for (int i = 0; i < steps; i++) {
        for (int k = 0; k < 2; k++) {
            llama_token t = (*fo[k])[i];
            if (llama_decode(ctx[k], llama_batch_get_one(&t, 1)) != 0) {
                die("decode failed (two contexts)");
            }
            const float * lg = llama_get_logits_ith(ctx[k], -1);
            o[k]->logits.insert(o[k]->logits.end(), lg, lg + nv[k]);
        }
    }
}

struct cmp {
    double min_cos = 1, mean_cos = 0, max_abs = 0;
    int top1_agree = 0, n = 0;
};

cmp compare(const std::vector<float> & a, const std::vector<float> & b, int n_vocab, int steps) {
    cmp c;
    for (int s = 0; s < steps; s++) {
        const float * x = a.data() + (size_t) s * n_vocab;
        const float * y = b.data() + (size_t) s * n_vocab;
        double xy = 0, xx = 0, yy = 0;
        for (int i = 0; i < n_vocab; i++) {
            xy += (double) x[i] * y[i];
            xx += (double) x[i] * x[i];
            yy += (double) y[i] * y[i];
            c.max_abs = std::max(c.max_abs, (double) std::fabs(x[i] - y[i]));
        }
        const double cs = xy / std::sqrt(std::max(xx * yy, 1e-300));
        c.min_cos = std::min(c.min_cos, cs);
        c.mean_cos += cs / steps;
        c.top1_agree += argmax(x, n_vocab) == argmax(y, n_vocab);
        c.n++;
    }
    return c;
}

std::string json(const cmp & c) {
    char b[256];
    snprintf(b, sizeof b, "{\"steps\":%d,\"min_cos\":%.7f,\"mean_cos\":%.7f,\"max_abs\":%.5g,\"top1_agree\":%.4f}", c.n,
             c.min_cos, c.mean_cos, c.max_abs, c.n ? (double) c.top1_agree / c.n : 0.0);
    return b;
}

void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

}  // namespace

int main(int argc, char ** argv) {
    std::string model_path, with_path;
    int steps = 256, fa = 0, n_prompt = 8, seed = 1, cpu_steps = 0, ref_cpu_steps = 0, n_ctx = 0;
    llama_split_mode split_mode = LLAMA_SPLIT_MODE_LAYER;  // llama.cpp's default
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> const char * {
            if (i + 1 >= argc) die("missing value after " + a);
            return argv[++i];
        };
        if (a == "--steps") steps = atoi(next());
        else if (a == "--fa") fa = atoi(next());
        else if (a == "--prompt") n_prompt = atoi(next());
        else if (a == "--seed") seed = atoi(next());
        else if (a == "--cpu-steps") cpu_steps = atoi(next());
        else if (a == "--ref-cpu") ref_cpu_steps = atoi(next());
        else if (a == "--ctx") n_ctx = atoi(next());
        else if (a == "--with") with_path = next();
        else if (a == "--split-mode") {
            const std::string v = next();
            split_mode = v == "none" ? LLAMA_SPLIT_MODE_NONE : v == "layer" ? LLAMA_SPLIT_MODE_LAYER
                       : v == "row" ? LLAMA_SPLIT_MODE_ROW : v == "tensor" ? LLAMA_SPLIT_MODE_TENSOR
                       : (die("--split-mode: none, layer, row or tensor"), LLAMA_SPLIT_MODE_LAYER);
        }
        else if (a[0] != '-') model_path = a;
        else die("unknown option " + a);
    }
    if (model_path.empty()) {
        die("usage: mk-compare MODEL [--steps N] [--fa 0|1] [--prompt N] [--seed S] [--cpu-steps K] [--ref-cpu K] "
            "[--ctx N] [--with MODEL2] [--split-mode none|layer|row|tensor]");
    }
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("MEGAKERNEL");
    if (reg == nullptr && getenv("GGML_BACKEND_PATH")) {  // unpatched llama.cpp: load it ourselves
        ggml_backend_load(getenv("GGML_BACKEND_PATH"));
        reg = ggml_backend_reg_by_name("MEGAKERNEL");
    }
    if (reg == nullptr) {
        die("the plugin is not loaded (set GGML_BACKEND_PATH to libggml-megakernel.so; needs the patched llama.cpp)");
    }
    plugin_api api;
    api.set_enabled      = (void (*)(int)) ggml_backend_reg_get_proc_address(reg, "llama_mk_set_enabled");
    api.set_cpu_executor = (void (*)(int)) ggml_backend_reg_get_proc_address(reg, "llama_mk_set_cpu_executor");
    api.status_json      = (size_t (*)(char *, size_t)) ggml_backend_reg_get_proc_address(reg, "llama_mk_status_json");
    api.reset_counters   = (void (*)(void)) ggml_backend_reg_get_proc_address(reg, "llama_mk_reset_counters");
    api.explain_json     = (size_t (*)(char *, size_t)) ggml_backend_reg_get_proc_address(reg, "llama_mk_explain_json");
    if (!api.set_enabled || !api.status_json || !api.reset_counters || !api.set_cpu_executor) {
        die("the plugin lacks the llama_mk_* API");
    }

    auto load = [&](int ngl, const std::string & path) {
        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers = ngl;
        if (ngl > 0) mp.split_mode = split_mode;
        llama_model * m = llama_model_load_from_file(path.c_str(), mp);
        if (m == nullptr) die("cannot load " + path);
        return m;
    };
    auto make_ctx = [&](llama_model * m) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = n_ctx > 0 ? n_ctx : std::max(512, n_prompt + steps + 64);
        cp.n_batch = std::max(512, n_prompt);
        cp.n_ubatch = 512;
        cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        llama_context * c = llama_init_from_model(m, cp);
        if (c == nullptr) die("cannot create a context");
        return c;
    };

    llama_model * model = load(99, model_path);
    llama_context * ctx = make_ctx(model);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::mt19937 rng(seed);
    std::vector<llama_token> prompt(n_prompt);
    for (auto & t : prompt) t = (llama_token) (rng() % n_vocab);

    api.set_enabled(0);
    run_out A = run(ctx, n_vocab, prompt, steps, nullptr, true);
    api.set_enabled(1);
    api.reset_counters();
    run_out B = run(ctx, n_vocab, prompt, steps, &A.tokens, true);
    const std::string status_b = api.status();
    run_out C = run(ctx, n_vocab, prompt, steps, nullptr, false);
    const std::string status_c = api.status();
    std::string bytes_per_token = "null";
    if (api.explain_json) {  // the last program compiled: this model's decode graph at the context reached
        std::vector<char> buf(api.explain_json(nullptr, 0) + 1);
        api.explain_json(buf.data(), buf.size());
        const char * k = strstr(buf.data(), "\"bytes_per_token\":");
        if (k) bytes_per_token = std::to_string(atoll(k + strlen("\"bytes_per_token\":")));
    }
    int same = 0;
    while (same < steps && A.tokens[same] == C.tokens[same]) same++;
    const cmp ab = compare(A.logits, B.logits, n_vocab, steps);

    std::string e_json = "null";
    if (!with_path.empty()) {
        llama_model * m2 = load(99, with_path);
        llama_context * c2 = make_ctx(m2);
        const int nv2 = llama_vocab_n_tokens(llama_model_get_vocab(m2));
        std::vector<llama_token> p2(n_prompt);
        for (auto & t : p2) t = (llama_token) (rng() % nv2);
        api.reset_counters();
        run_out E = run(c2, nv2, p2, steps, nullptr, true);  // MODEL2 alone, greedy
        run_out I1, I2;
        interleave(ctx, n_vocab, prompt, A.tokens, c2, nv2, p2, E.tokens, steps, I1, I2);
        const std::string status_e = api.status();
        const cmp b1 = compare(B.logits, I1.logits, n_vocab, steps);
        const cmp e2 = compare(E.logits, I2.logits, nv2, steps);
        e_json = "{\"model2\":\"" + with_path + "\",\"first_alone_vs_together\":" + json(b1) +
                 ",\"second_alone_vs_together\":" + json(e2) + ",\"status\":" + status_e + "}";
        llama_free(c2);
        llama_model_free(m2);
    }

    llama_free(ctx);  // the GPU model's memory is not needed by the CPU runs below
    llama_model_free(model);
    std::string r_json = "null";
    if (ref_cpu_steps > 0) {
        ref_cpu_steps = std::min(ref_cpu_steps, steps);
        api.set_enabled(0);
        api.set_cpu_executor(0);
        llama_model * mr = load(0, model_path);
        llama_context * cr = make_ctx(mr);
        std::vector<int> forced(A.tokens.begin(), A.tokens.begin() + ref_cpu_steps);
        run_out R = run(cr, n_vocab, prompt, ref_cpu_steps, &forced, true);
        const cmp ar = compare(A.logits, R.logits, n_vocab, ref_cpu_steps);
        const cmp br = compare(B.logits, R.logits, n_vocab, ref_cpu_steps);
        // stock CPU's own greedy tokens: how long two stock implementations stay on the same tokens (A), and how
        // long the megakernel's (C) stay on stock CPU's
        const run_out RF = run(cr, n_vocab, prompt, ref_cpu_steps, nullptr, false);
        int same_a = 0, same_c = 0;
        while (same_a < ref_cpu_steps && RF.tokens[same_a] == A.tokens[same_a]) same_a++;
        while (same_c < ref_cpu_steps && RF.tokens[same_c] == C.tokens[same_c]) same_c++;
        r_json = "{\"stock_cuda_vs_stock_cpu\":" + json(ar) + ",\"megakernel_vs_stock_cpu\":" + json(br) +
                 ",\"free_greedy_identical_steps\":{\"stock_cuda_vs_stock_cpu\":" + std::to_string(same_a) +
                 ",\"megakernel_vs_stock_cpu\":" + std::to_string(same_c) + "}}";
        llama_free(cr);
        llama_model_free(mr);
        api.set_enabled(1);
    }

    std::string d_json = "null";
    if (cpu_steps > 0) {
        cpu_steps = std::min(cpu_steps, steps);
        api.set_cpu_executor(1);  // before loading: keeps the CPU weights in the GGUF layout
        llama_model * mc = load(0, model_path);
        llama_context * cc = make_ctx(mc);
        api.reset_counters();
        std::vector<int> forced(A.tokens.begin(), A.tokens.begin() + cpu_steps);
        run_out D = run(cc, n_vocab, prompt, cpu_steps, &forced, true);
        const std::string status_d = api.status();
        const cmp bd = compare(B.logits, D.logits, n_vocab, cpu_steps);
        const cmp ad = compare(A.logits, D.logits, n_vocab, cpu_steps);
        d_json = "{\"gpu_vs_cpu_executor\":" + json(bd) + ",\"stock_vs_cpu_executor\":" + json(ad) +
                 ",\"status\":" + status_d + "}";
        llama_free(cc);
        llama_model_free(mc);
    }
    printf("{\"model\":\"%s\",\"flash_attn\":%d,\"prompt\":%d,\"steps\":%d,\"n_vocab\":%d,"
           "\"bytes_per_token\":%s,\"teacher_forced\":%s,\"free_greedy_identical_steps\":%d,\"status_forced\":%s,\"status_free\":%s,\"cpu\":%s,"
           "\"two_contexts\":%s,\"ref_cpu\":%s}\n",
           model_path.c_str(), fa, n_prompt, steps, n_vocab, bytes_per_token.c_str(), json(ab).c_str(), same, status_b.c_str(), status_c.c_str(),
           d_json.c_str(), e_json.c_str(), r_json.c_str());
    llama_backend_free();
    return 0;
}
