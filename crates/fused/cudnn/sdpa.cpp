// Causal attention with a sliding window through cuDNN's fused SDPA, forward and backward, over
// NVIDIA's header-only cuDNN frontend. Built with the frontend's dynamic loading: nothing links
// against cuDNN, `libcudnn.so.9` is opened at the first call, and a machine without it only
// loses this path (the flash kernels run instead).
//
// Layouts (bf16): q, k, v, dq, dk, dv [B, H, T, D] contiguous; o and do [B, T, H, D] (the heads
// side by side, as the output projection reads them); stats [B, H, T] f32, the rows'
// natural-log sum-exp, which only this file's backward reads.
//
// Every entry point returns 0, or 1 with a message for `ar_cudnn_error` (C++ exceptions stop
// here). Graphs are built once per shape (batch size included) and kept.

#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <cudnn_frontend.h>

namespace cudnn_frontend {
// The frontend's dynamic loading looks every cuDNN symbol up in this handle.
void *cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

namespace fe = cudnn_frontend;

namespace {

thread_local std::string last_error;

int fail(std::string message) {
    last_error = std::move(message);
    return 1;
}

enum Uid : int64_t { Q = 1, K, V, O, STATS, DO, DQ, DK, DV };

struct Key {
    bool backward;
    int64_t b, h, t, d, window;
    bool deterministic;
    bool operator<(const Key &o) const {
        return std::tie(backward, b, h, t, d, window, deterministic) <
               std::tie(o.backward, o.b, o.h, o.t, o.d, o.window, o.deterministic);
    }
};

// Never destroyed: the graphs' plans would be released into a cuDNN whose own statics may be
// gone at exit (the frontend leaks its statics for the same reason).
std::mutex &lock = *new std::mutex;
cudnnHandle_t handle = nullptr;
std::map<Key, std::shared_ptr<fe::graph::Graph>> &graphs =
    *new std::map<Key, std::shared_ptr<fe::graph::Graph>>;

// The frontend opens the CUDA runtime by name and takes the first of .12 and .13 it finds; this
// process runs on CUDA 13 (unless the user chose otherwise). Set at load, before any thread.
__attribute__((constructor)) void choose_cudart() {
    setenv("CUDNN_FRONTEND_CUDART_LIB_NAME", "libcudart.so.13", 0);
}

std::vector<int64_t> heads_major(const Key &k) { return {k.h * k.t * k.d, k.t * k.d, k.d, 1}; }
// [B, T, H, D] seen as [B, H, T, D].
std::vector<int64_t> tokens_major(const Key &k) { return {k.t * k.h * k.d, k.d, k.h * k.d, 1}; }

std::shared_ptr<fe::graph::Tensor_attributes> input(fe::graph::Graph &g, const char *name, Uid uid,
                                                    const Key &k, std::vector<int64_t> stride) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_uid(uid)
                        .set_dim({k.b, k.h, k.t, k.d})
                        .set_stride(std::move(stride)));
}

std::vector<int64_t> stats_stride(const Key &k) { return {k.h * k.t, k.t, 1, 1}; }

// The mask both ways: query i sees keys i - window ..= i. cuDNN's left bound keeps key j where
// j + bound > i, so the bound is window + 1; a window as long as the rows is plain causal.
template <typename Attributes> void mask(Attributes &a, const Key &k) {
    a.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
    if (k.window < k.t) {
        a.set_diagonal_band_left_bound(k.window + 1);
    }
}

std::shared_ptr<fe::graph::Graph> build(const Key &k) {
    // 1/√D, as the flash kernels and the plain path.
    float scale = 1.0f / std::sqrt(static_cast<float>(k.d));
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto q = input(*g, "q", Q, k, heads_major(k));
    auto kk = input(*g, "k", K, k, heads_major(k));
    auto v = input(*g, "v", V, k, heads_major(k));
    if (!k.backward) {
        auto options =
            fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(true).set_attn_scale(scale);
        mask(options, k);
        auto [o, stats] = g->sdpa(q, kk, v, options);
        o->set_output(true).set_uid(O).set_dim({k.b, k.h, k.t, k.d}).set_stride(tokens_major(k));
        stats->set_output(true)
            .set_uid(STATS)
            .set_data_type(fe::DataType_t::FLOAT)
            .set_dim({k.b, k.h, k.t, 1})
            .set_stride(stats_stride(k));
    } else {
        auto o = input(*g, "o", O, k, tokens_major(k));
        auto d_o = input(*g, "do", DO, k, tokens_major(k));
        auto stats = g->tensor(fe::graph::Tensor_attributes()
                                   .set_name("stats")
                                   .set_uid(STATS)
                                   .set_dim({k.b, k.h, k.t, 1})
                                   .set_stride(stats_stride(k))
                                   .set_data_type(fe::DataType_t::FLOAT));
        auto options = fe::graph::SDPA_backward_attributes()
                           .set_name("sdpa_backward")
                           .set_attn_scale(scale)
                           .set_deterministic_algorithm(k.deterministic);
        mask(options, k);
        auto [dq, dk, dv] = g->sdpa_backward(q, kk, v, o, d_o, stats, options);
        dq->set_output(true).set_uid(DQ).set_dim({k.b, k.h, k.t, k.d}).set_stride(heads_major(k));
        dk->set_output(true).set_uid(DK).set_dim({k.b, k.h, k.t, k.d}).set_stride(heads_major(k));
        dv->set_output(true).set_uid(DV).set_dim({k.b, k.h, k.t, k.d}).set_stride(heads_major(k));
    }
    auto check = [](fe::error_t status, const char *step) {
        if (status.is_bad()) {
            throw std::runtime_error(std::string(step) + ": " + status.get_message());
        }
    };
    check(g->validate(), "validate");
    check(g->build_operation_graph(handle), "build_operation_graph");
    check(g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}), "create_execution_plans");
    check(g->check_support(handle), "check_support");
    check(g->build_plans(handle), "build_plans");
    return g;
}

// The graph for `k` (built at its first use), the handle bound to `stream` (the caller's, as
// candle's is per thread), under `lock`.
fe::graph::Graph &graph(const Key &k, void *stream) {
    if (handle == nullptr) {
        throw std::runtime_error("ar_cudnn_open was not called");
    }
    cudnnStatus_t status = fe::detail::set_stream(handle, static_cast<cudaStream_t>(stream));
    if (status != CUDNN_STATUS_SUCCESS) {
        throw std::runtime_error(std::string("cudnnSetStream: ") + fe::detail::get_error_string(status));
    }
    auto found = graphs.find(k);
    if (found == graphs.end()) {
        found = graphs.emplace(k, build(k)).first;
    }
    return *found->second;
}

Key key(bool backward, int64_t b, int64_t h, int64_t t, int64_t d, int64_t window, int deterministic) {
    return Key{backward, b, h, t, d, window < t ? window : t, backward && deterministic != 0};
}

// Opens libcudnn.so.9 (once); `version` gets cuDNN's. Needs no GPU.
int load(size_t *version) {
    if (fe::cudnn_dlhandle == nullptr) {
        dlerror();
        void *lib = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_LOCAL);
        if (lib == nullptr) {
            const char *why = dlerror();
            return fail(std::string("libcudnn.so.9 not found (") + (why ? why : "dlopen failed") +
                        "); put cuDNN 9's lib folder on LD_LIBRARY_PATH");
        }
        fe::cudnn_dlhandle = lib;
    }
    *version = fe::detail::get_backend_version();
    return 0;
}

// The CUDA runtime version the loaded cuDNN was built for (0 where it does not say).
size_t cudart_version() {
    auto get = reinterpret_cast<size_t (*)()>(dlsym(fe::cudnn_dlhandle, "cudnnGetCudartVersion"));
    return get ? get() : 0;
}

template <typename F> int guarded(F body) {
    try {
        std::lock_guard<std::mutex> guard(lock);
        return body();
    } catch (const std::exception &e) {
        return fail(e.what());
    } catch (...) {
        return fail("an unknown C++ exception in the cuDNN frontend");
    }
}

}  // namespace

extern "C" {

const char *ar_cudnn_error(void) { return last_error.c_str(); }

// cuDNN's version and the CUDA runtime's it was built for, its library opened: what a machine
// without a GPU can ask.
int ar_cudnn_load(size_t *version, size_t *cudart) {
    return guarded([&] {
        if (load(version) != 0) {
            return 1;
        }
        *cudart = cudart_version();
        return 0;
    });
}

// Opens libcudnn.so.9 (once) and makes the handle; `version` gets cuDNN's, `cudart` the CUDA
// runtime version it was built for (13000 and up for this process).
int ar_cudnn_open(size_t *version, size_t *cudart) {
    return guarded([&] {
        if (load(version) != 0) {
            return 1;
        }
        *cudart = cudart_version();
        if (handle == nullptr) {
            cudnnHandle_t made = nullptr;
            cudnnStatus_t status = fe::detail::create_handle(&made);
            if (status != CUDNN_STATUS_SUCCESS) {
                return fail(std::string("cudnnCreate: ") + fe::detail::get_error_string(status));
            }
            handle = made;
        }
        return 0;
    });
}

// The workspace, in bytes, the forward (backward = 0) or backward pass at this shape needs;
// builds its graph.
int ar_sdpa_workspace(void *stream, int backward, int64_t b, int64_t h, int64_t t, int64_t d,
                      int64_t window, int deterministic, int64_t *bytes) {
    return guarded([&] {
        auto &g = graph(key(backward != 0, b, h, t, d, window, deterministic), stream);
        auto status = g.get_workspace_size(*bytes);
        if (status.is_bad()) {
            return fail("get_workspace_size: " + status.get_message());
        }
        return 0;
    });
}

int ar_sdpa_forward(void *stream, int64_t b, int64_t h, int64_t t, int64_t d, int64_t window,
                    void *q, void *k, void *v, void *o, void *stats, void *workspace) {
    return guarded([&] {
        auto &g = graph(key(false, b, h, t, d, window, 0), stream);
        std::unordered_map<int64_t, void *> pack{{Q, q}, {K, k}, {V, v}, {O, o}, {STATS, stats}};
        auto status = g.execute(handle, pack, workspace);
        if (status.is_bad()) {
            return fail("forward: " + status.get_message());
        }
        return 0;
    });
}

int ar_sdpa_backward(void *stream, int64_t b, int64_t h, int64_t t, int64_t d, int64_t window,
                     int deterministic, void *q, void *k, void *v, void *o, void *d_o,
                     void *stats, void *dq, void *dk, void *dv, void *workspace) {
    return guarded([&] {
        auto &g = graph(key(true, b, h, t, d, window, deterministic), stream);
        std::unordered_map<int64_t, void *> pack{{Q, q},         {K, k},   {V, v},
                                                 {O, o},         {DO, d_o}, {STATS, stats},
                                                 {DQ, dq},       {DK, dk}, {DV, dv}};
        auto status = g.execute(handle, pack, workspace);
        if (status.is_bad()) {
            return fail("backward: " + status.get_message());
        }
        return 0;
    });
}

}  // extern "C"
