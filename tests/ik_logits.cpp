// The logits ik_llama.cpp computes for a GGUF file, for tests/test_gguf.py (slow tier) to hold against
// this package's. Built by that test against an ik_llama.cpp build (its libllama.a and libggml.a);
// nothing here is part of the package.
//
//   ik_logits MODEL.gguf THREADS PROMPT_IDS(comma-separated) STEPS OUT.bin
//
// Runs the prompt as one batch (logits at every position), then STEPS greedy steps of one token
// each (ik's argmax of the last logits), and writes float32 logits, row after row:
// len(prompt) rows for the prompt's positions, then one row per step; the greedy tokens are printed
// on stdout as one comma-separated line ("tokens: ...").
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static std::vector<llama_token> parse_ids(const char * text) {
    std::vector<llama_token> ids;
    std::string s(text), cur;
    for (char c : s + ",") {
        if (c == ',') {
            if (!cur.empty()) ids.push_back((llama_token) std::atoi(cur.c_str()));
            cur.clear();
        } else {
            cur += c;
        }
    }
    return ids;
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s MODEL.gguf THREADS PROMPT_IDS STEPS OUT.bin\n", argv[0]);
        return 2;
    }
    const int threads = std::atoi(argv[2]);
    std::vector<llama_token> prompt = parse_ids(argv[3]);
    const int steps = std::atoi(argv[4]);
    if (prompt.empty() || steps < 0) {
        std::fprintf(stderr, "an empty prompt or a negative step count\n");
        return 2;
    }
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        std::fprintf(stderr, "ik_llama.cpp could not load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (prompt.size() + steps + 8);
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_threads = (uint32_t) threads;
    cp.n_threads_batch = (uint32_t) threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        std::fprintf(stderr, "no context for %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_n_vocab(model);
    FILE * out = std::fopen(argv[5], "wb");
    if (!out) {
        std::fprintf(stderr, "cannot write %s\n", argv[5]);
        return 1;
    }

    llama_batch batch = llama_batch_init((int32_t) prompt.size(), 0, 1);
    for (size_t i = 0; i < prompt.size(); ++i) {
        batch.token[i] = prompt[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = (int32_t) prompt.size();
    if (llama_decode(ctx, batch) != 0) {
        std::fprintf(stderr, "llama_decode failed on the prompt\n");
        return 1;
    }
    for (size_t i = 0; i < prompt.size(); ++i) {
        std::fwrite(llama_get_logits_ith(ctx, (int32_t) i), sizeof(float), n_vocab, out);
    }
    llama_batch_free(batch);

    std::string tokens;
    const float * last = llama_get_logits_ith(ctx, (int32_t) prompt.size() - 1);
    llama_pos pos = (llama_pos) prompt.size();
    for (int step = 0; step < steps; ++step) {
        llama_token best = 0;
        for (int v = 1; v < n_vocab; ++v) {
            if (last[v] > last[best]) best = v;
        }
        tokens += (step ? "," : "") + std::to_string(best);
        llama_batch one = llama_batch_init(1, 0, 1);
        one.token[0] = best;
        one.pos[0] = pos++;
        one.n_seq_id[0] = 1;
        one.seq_id[0][0] = 0;
        one.logits[0] = 1;
        one.n_tokens = 1;
        if (llama_decode(ctx, one) != 0) {
            std::fprintf(stderr, "llama_decode failed at step %d\n", step);
            return 1;
        }
        llama_batch_free(one);
        last = llama_get_logits_ith(ctx, 0);
        std::fwrite(last, sizeof(float), n_vocab, out);
    }
    std::fclose(out);
    std::printf("tokens: %s\n", tokens.c_str());
    llama_free(ctx);
    llama_free_model(model);
    llama_backend_free();
    return 0;
}
