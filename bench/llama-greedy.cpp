// llama.cpp's greedy continuation of a prompt, with the top-2 logit margin at every generated
// position: the reference data for bench/make-qwen-goldens.py (which compiles and runs this
// against the llama.cpp build it is given; llama-completion prints only text, not ids or logits).
//
//   llama-greedy MODEL.gguf N_PREDICT N_THREADS N_CTX PROMPT_FILE...
//
// It does what `llama-completion -bf PROMPT_FILE --no-escape -n N_PREDICT --temp 0 -t N_THREADS
// -c N_CTX -nr -no-cnv --no-warmup` does: tokenize with add_special and parse_special, decode
// the whole prompt as one batch (logits of its last token only), then one token at a time,
// taking the argmax (the first maximum, as llama.cpp's temperature-0 sampler) and stopping
// after an end-of-generation token. A fresh context per prompt, as a fresh process would have.
// `-nr` (no extra buffer types: no weight repacking, no AMX) is required on hosts whose CPU
// reports AMX that the hypervisor does not enable; it is applied here too so that the two agree.
//
// Output: one line per prompt, tab-separated:
//   file  prompt_ids  greedy_ids  margins  runner_up_ids  text_hex
// lists comma-separated; margins are top-1 minus top-2 logit; text_hex is the hex of the
// generated text as llama-completion prints it (control tokens render as nothing).

#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

template <typename T> static std::string join(const std::vector<T> & v, const char * fmt) {
    std::string out;
    char        buf[64];
    for (size_t i = 0; i < v.size(); i++) {
        snprintf(buf, sizeof(buf), fmt, v[i]);
        if (i) {
            out += ',';
        }
        out += buf;
    }
    return out;
}

int main(int argc, char ** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s MODEL.gguf N_PREDICT N_THREADS N_CTX PROMPT_FILE...\n", argv[0]);
        return 2;
    }
    const int n_predict = atoi(argv[2]);
    const int n_threads = atoi(argv[3]);
    const int n_ctx     = atoi(argv[4]);

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.use_extra_bufts    = false;
    mp.progress_callback  = [](float, void *) { return true; };
    llama_model * model   = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab   = llama_model_get_vocab(model);
    const int           n_vocab = llama_vocab_n_tokens(vocab);

    for (int a = 5; a < argc; a++) {
        std::ifstream     in(argv[a], std::ios::binary);
        std::stringstream ss;
        ss << in.rdbuf();
        const std::string text = ss.str();

        int                      n = -llama_tokenize(vocab, text.data(), (int) text.size(), nullptr, 0, true, true);
        std::vector<llama_token> prompt(n);
        if (llama_tokenize(vocab, text.data(), (int) text.size(), prompt.data(), n, true, true) != n) {
            fprintf(stderr, "tokenizing %s failed\n", argv[a]);
            return 1;
        }

        llama_context_params cp = llama_context_default_params();
        cp.n_ctx                = n_ctx;
        cp.n_threads            = n_threads;
        cp.n_threads_batch      = n_threads;
        cp.no_perf              = true;
        llama_context * ctx     = llama_init_from_model(model, cp);
        if (!ctx || llama_decode(ctx, llama_batch_get_one(prompt.data(), (int) prompt.size())) != 0) {
            fprintf(stderr, "decoding the prompt of %s failed\n", argv[a]);
            return 1;
        }

        std::vector<llama_token> ids, second;
        std::vector<float>       margins;
        std::string              out;
        for (int i = 0; i < n_predict; i++) {
            const float * l  = llama_get_logits_ith(ctx, -1);
            int           b1 = 0, b2 = -1;
            for (int t = 1; t < n_vocab; t++) {
                if (l[t] > l[b1]) {
                    b2 = b1;
                    b1 = t;
                } else if (b2 < 0 || l[t] > l[b2]) {
                    b2 = t;
                }
            }
            llama_token tok = b1;
            ids.push_back(tok);
            second.push_back(b2);
            margins.push_back(l[b1] - l[b2]);
            char piece[256];
            int  m = llama_token_to_piece(vocab, tok, piece, sizeof(piece), 0, false);
            if (m > 0) {
                out.append(piece, m);
            }
            if (llama_vocab_is_eog(vocab, tok)) {
                break;
            }
            if (llama_decode(ctx, llama_batch_get_one(&tok, 1)) != 0) {
                fprintf(stderr, "decoding failed at %d of %s\n", i, argv[a]);
                return 1;
            }
        }
        std::string hex;
        char        h[3];
        for (unsigned char c : out) {
            snprintf(h, sizeof(h), "%02x", c);
            hex += h;
        }
        printf("%s\t%s\t%s\t%s\t%s\t%s\n", argv[a], join(prompt, "%d").c_str(), join(ids, "%d").c_str(),
               join(margins, "%.5f").c_str(), join(second, "%d").c_str(), hex.c_str());
        fflush(stdout);
        llama_free(ctx);
    }
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
