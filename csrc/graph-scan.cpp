#include "graph-scan.h"
#include "json.h"
#include "program.h"

#include "ggml-backend.h"
#include "ggml-impl.h"
#include "ggml.h"

#include <algorithm>
#include <cstring>
#include <set>

namespace mk {

// Ops of the llama-family decode graph (see the compiler issue). Views and reshapes cost nothing; they are
// listed so that an op outside this set is a real reason to hand the graph back.
static bool op_supported(const ggml_tensor * t) {
    switch (t->op) {
        case GGML_OP_NONE:
        case GGML_OP_VIEW:
        case GGML_OP_RESHAPE:
        case GGML_OP_PERMUTE:
        case GGML_OP_TRANSPOSE:
        case GGML_OP_GET_ROWS:
        case GGML_OP_SET_ROWS:
        case GGML_OP_CPY:
        case GGML_OP_CONT:
        case GGML_OP_RMS_NORM:
        case GGML_OP_MUL:
        case GGML_OP_ADD:
        case GGML_OP_SCALE:
        case GGML_OP_MUL_MAT:
        case GGML_OP_ROPE:
        case GGML_OP_SOFT_MAX:
        case GGML_OP_FLASH_ATTN_EXT:
        case GGML_OP_CONCAT:          // Gated DeltaNet: the conv window
        case GGML_OP_SSM_CONV:
        case GGML_OP_GATED_DELTA_NET:
            return true;
        case GGML_OP_GLU:
            return glu_supported(ggml_get_glu_op(t));
        case GGML_OP_UNARY:
            return unary_supported(ggml_get_unary_op(t));
        default:
            return false;
    }
}

static bool weight_type_supported(ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
        case GGML_TYPE_Q8_0: case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
            return true;
        default:
            return false;
    }
}

static bool is_weight(const ggml_tensor * t) {
    const ggml_tensor * base = t->view_src ? t->view_src : t;
    return base->buffer && ggml_backend_buffer_get_usage(base->buffer) == GGML_BACKEND_BUFFER_USAGE_WEIGHTS;
}

graph_scan scan_graph(const ggml_cgraph * g) {
    graph_scan s;
    s.uid     = g->uid;
    s.n_nodes = g->n_nodes;

    std::string first_bad_op, bad_type;
    int max_tokens = 0;
    for (int i = 0; i < g->n_nodes; i++) {
        const ggml_tensor * t = g->nodes[i];
        s.ops[ggml_op_desc(t)]++;
        if (first_bad_op.empty() && !op_supported(t)) {
            first_bad_op = ggml_op_desc(t);
        }
        if ((t->op == GGML_OP_MUL_MAT || t->op == GGML_OP_MUL_MAT_ID) && is_weight(t->src[0])) {
            const ggml_tensor * w = t->src[0];
            const ggml_tensor * x = t->src[1];
            s.n_weight_matmuls++;
            s.weight_types[ggml_type_name(w->type)]++;
            const ggml_tensor * wb = w->view_src ? w->view_src : w;
            s.weight_bufts[ggml_backend_buft_name(ggml_backend_buffer_get_type(wb->buffer))]++;
            s.weights_on_host = s.weights_on_host && ggml_backend_buffer_is_host(wb->buffer);
            max_tokens = std::max<int>(max_tokens, (int) (x->ne[1] * x->ne[2] * x->ne[3]));
            if (bad_type.empty() && !weight_type_supported(w->type)) {
                bad_type = std::string(ggml_type_name(w->type)) + " (" + w->name + ")";
            }
        }
    }
    s.n_tokens = max_tokens;

    if (g->uid == 0) {
        // The scheduler gives every split a uid; the slices it computes one by one when an eval callback watches
        // the nodes (ggml_graph_view) have none.
        s.reason = "graph-view";
        s.detail = "slice of a split (eval callback or partial graph), not a whole decode graph";
    } else if (s.n_weight_matmuls == 0) {
        s.reason = "no-weight-matmul";
        s.detail = "no matmul against model weights (embedding, KV-shift or output-reorder split)";
    } else if (max_tokens != 1) {
        s.reason = "batch>1";
        s.detail = std::to_string(max_tokens) + " tokens per step (prefill or batched decode)";
    } else {
        s.decode = true;
    }
    if (!s.decode) {
        return s;
    }
    if (!first_bad_op.empty()) {
        s.reason = "unsupported-op";
        s.detail = "op " + first_bad_op;
    } else if (!bad_type.empty()) {
        s.reason = "unsupported-type";
        s.detail = "weight type " + bad_type;
    } else {
        s.supported = true;
        s.reason = "no-executor";
        s.detail = "batch-1 decode graph recognised; no executor for this backend";
    }
    return s;
}

static const char * const k_architectures[] = {"llama", "qwen2", "qwen3", "gemma3", "qwen35"};

bool architecture_supported(const std::string & arch) {
    for (const char * a : k_architectures) {
        if (arch == a) {
            return true;
        }
    }
    return false;
}

std::string supported_json() {
    std::string archs, ops, glus, unaries, types;
    for (const char * a : k_architectures) {
        archs += (archs.empty() ? "" : ",") + json_str(a);
    }
    ggml_tensor t = {};
    for (int op = 0; op < GGML_OP_COUNT; op++) {
        t.op = (ggml_op) op;
        if (op != GGML_OP_NONE && op != GGML_OP_GLU && op != GGML_OP_UNARY && op_supported(&t)) {
            ops += (ops.empty() ? "" : ",") + json_str(ggml_op_name((ggml_op) op));
        }
    }
    for (int g = 0; g < GGML_GLU_OP_COUNT; g++) {
        if (glu_supported(g)) {
            glus += (glus.empty() ? "" : ",") + json_str(ggml_glu_op_name((ggml_glu_op) g));
        }
    }
    for (int u = 0; u < GGML_UNARY_OP_COUNT; u++) {
        if (unary_supported(u)) {
            unaries += (unaries.empty() ? "" : ",") + json_str(ggml_unary_op_name((ggml_unary_op) u));
        }
    }
    for (int ty = 0; ty < GGML_TYPE_COUNT; ty++) {
        if (ggml_get_type_traits((ggml_type) ty)->type_name && weight_type_supported((ggml_type) ty)) {
            types += (types.empty() ? "" : ",") + json_str(ggml_type_name((ggml_type) ty));
        }
    }
    return "{\"architectures\":[" + archs + "],\"ops\":[" + ops + "],\"glu_ops\":[" + glus + "],\"unary_ops\":[" + unaries +
           "],\"weight_types\":[" + types + "]}";
}

std::string dump_graph(const ggml_cgraph * g) {
    std::map<const ggml_tensor *, int> index;
    std::string o;
    char buf[512];
    auto shape = [](const int64_t * v, char sep) {
        std::string r;
        for (int d = 0; d < GGML_MAX_DIMS; d++) {
            r += (d ? std::string(1, sep) : "") + std::to_string(v[d]);
        }
        return r;
    };
    for (int i = 0; i < g->n_nodes; i++) {
        const ggml_tensor * t = g->nodes[i];
        index[t] = i;
        int64_t nb[GGML_MAX_DIMS];
        for (int d = 0; d < GGML_MAX_DIMS; d++) {
            nb[d] = (int64_t) t->nb[d];
        }
        snprintf(buf, sizeof(buf), "%4d %-14s %-28s %-5s ne=%s nb=%s", i, ggml_op_desc(t), t->name,
                 ggml_type_name(t->type), shape(t->ne, ',').c_str(), shape(nb, ',').c_str());
        o += buf;
        if (t->view_src) {
            o += " view_offs=" + std::to_string(t->view_offs);
        }
        for (int s = 0; s < GGML_MAX_SRC && t->src[s]; s++) {
            auto it = index.find(t->src[s]);
            o += s ? "," : " src=";
            o += it != index.end() ? "#" + std::to_string(it->second)
                                   : std::string(t->src[s]->name) + "[" + ggml_type_name(t->src[s]->type) + " " +
                                         shape(t->src[s]->ne, 'x') + (is_weight(t->src[s]) ? " w" : "") + "]";
        }
        std::string params;
        for (int k = 0; k < 8; k++) {
            if (t->op_params[k]) {
                float f;
                memcpy(&f, &t->op_params[k], 4);
                snprintf(buf, sizeof(buf), " p%d=%d/%g", k, t->op_params[k], f);
                params += buf;
            }
        }
        o += params;
        if (t->flags & GGML_TENSOR_FLAG_OUTPUT) {
            o += " OUTPUT";
        }
        o += "\n";
    }
    return o;
}

std::string to_json(const graph_scan & s) {
    return std::string("{") +
        "\"uid\":" + std::to_string(s.uid) +
        ",\"n_nodes\":" + std::to_string(s.n_nodes) +
        ",\"n_tokens\":" + std::to_string(s.n_tokens) +
        ",\"n_weight_matmuls\":" + std::to_string(s.n_weight_matmuls) +
        ",\"decode\":" + (s.decode ? "true" : "false") +
        ",\"supported\":" + (s.supported ? "true" : "false") +
        ",\"weights_on_host\":" + (s.weights_on_host ? "true" : "false") +
        ",\"reason\":" + json_str(s.reason) +
        ",\"detail\":" + json_str(s.detail) +
        ",\"ops\":" + json_counts(s.ops) +
        ",\"weight_types\":" + json_counts(s.weight_types) +
        ",\"weight_bufts\":" + json_counts(s.weight_bufts) + "}";
}

}  // namespace mk
