// LLAMA_MEGAKERNEL_GPU=auto (and LLAMA_MEGAKERNEL_CPU=auto): for each model on each backend, time a few decode
// tokens on each path, the executor and the stock backend, and keep the faster one.
//
// A token's time is the interval from the start of one decode graph's computation to the start of the next one on
// the same backend: llama.cpp reads the logits before it builds the next token, so the interval holds the whole step
// (on either path) and the host's own work, which both paths share. The paths alternate token by token after a
// warm-up (the executor's first step loads its program; stock's first steps capture its CUDA graph). Once each path
// has k_samples intervals, the lower median wins; a tie goes to stock. The choice is kept per model (the addresses of
// its weights on that backend), so the graph rebuilds every 256 KV cells and after each prompt do not measure again;
// it is made at the context length where it was measured.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace mk {

enum class exec_mode { off, on, autopick };

inline exec_mode parse_exec_mode(const char * s) {
    if (s == nullptr) {
        return exec_mode::off;
    }
    if (std::string(s) == "auto") {
        return exec_mode::autopick;
    }
    return atoi(s) != 0 ? exec_mode::on : exec_mode::off;
}

inline const char * exec_mode_name(exec_mode m) {
    return m == exec_mode::on ? "on" : m == exec_mode::autopick ? "auto" : "off";
}

struct path_choice {
    using clock = std::chrono::steady_clock;
    enum path : int { stock = 0, executor = 1 };
    static constexpr int k_warmup  = 4;   // calls of each new program whose following interval does not count
    static constexpr int k_samples = 8;   // intervals per path before deciding
    static constexpr int k_give_up = 64;  // calls without enough usable intervals: stock (nothing could be measured)
    static constexpr double k_outlier = 10.0;  // an interval above this many times its path's shortest: a pause

    int decided = -1;  // -1: measuring; else the path
    std::string why;   // how it was decided
    std::vector<double> us[2];
    double median_us[2] = {0, 0};
    int calls = 0;
    // the previous call, if an interval may follow it: its path and start; the calls since the program changed
    int last = -1, calls_in_program = 0;
    clock::time_point t_last;

    static double median(std::vector<double> v) {
        if (v.empty()) {
            return 0.0;
        }
        std::sort(v.begin(), v.end());
        const size_t n = v.size();
        return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    }

    // A new program of the same model: intervals across the change would hold its compile and load.
    void new_program() {
        last = -1;
        calls_in_program = 0;
    }

    // The path for the call starting at t; count the interval since the previous call.
    int pick(clock::time_point t) {
        if (decided >= 0) {
            return decided;
        }
        if (last >= 0 && calls_in_program > k_warmup) {
            const double dt = std::chrono::duration<double, std::micro>(t - t_last).count();
            double shortest = dt;  // of this path: the other may well be ten times slower
            for (double x : us[last]) {
                shortest = std::min(shortest, x);
            }
            if (dt <= k_outlier * shortest) {
                us[last].push_back(dt);
            }
        }
        if ((int) us[stock].size() >= k_samples && (int) us[executor].size() >= k_samples) {
            median_us[stock]    = median(us[stock]);
            median_us[executor] = median(us[executor]);
            decided = median_us[executor] < median_us[stock] ? executor : stock;
            char b[160];
            snprintf(b, sizeof b, "measured: %.1f us a token on the executor, %.1f us on stock (medians of %d)",
                     median_us[executor], median_us[stock], k_samples);
            why = b;
            return decided;
        }
        if (calls >= k_give_up) {
            decided = stock;
            why = "no usable intervals after " + std::to_string(calls) + " calls (graphs not one a token?): stock";
            return decided;
        }
        return calls % 2 == 0 ? executor : stock;
    }

    // The call that started at t took path p.
    void ran(int p, clock::time_point t) {
        last = p;
        t_last = t;
        calls++;
        calls_in_program++;
    }

    const char * state() const { return decided < 0 ? "measuring" : decided == executor ? "executor" : "stock"; }
};

}  // namespace mk
