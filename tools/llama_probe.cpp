// clawconvert-llama-probe: run a GGUF language model (and an mmproj) through llama.cpp's own
// libraries and print what the slow tests compare with transformers.
//
//   clawconvert-llama-probe MODEL MMPROJ|- RGB|- WIDTH HEIGHT PROMPT N_GREEDY LOGITS_OUT
//
// With an mmproj, RGB is a raw WIDTH x HEIGHT x 3 byte file and PROMPT holds one media marker
// (mtmd_default_marker()); the prompt is split and tokenized by mtmd_tokenize, the image encoded
// by clip.cpp, and both evaluated by mtmd_helper_eval_chunks, exactly as llama-mtmd-cli does.
// Without one ("-"), PROMPT is tokenized by llama_tokenize (BOS added, specials parsed).
// Prints one line per input chunk ("text ID ID ..." or "image N_TOKENS"), then "greedy ID ..."
// (N_GREEDY argmax tokens), and writes the logits after the prompt as raw float32 to LOGITS_OUT.
// Built by tools/build_llama_cpp.sh next to llama-mtmd-cli.
#include "llama.h"
#include "mtmd.h"
#include "mtmd-helper.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

static void errors_only(enum ggml_log_level level, const char * text, void * /*user*/) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static int fail(const char * what) {
    fprintf(stderr, "clawconvert-llama-probe: %s\n", what);
    return 1;
}

static void print_tokens(const char * label, const llama_token * tokens, size_t n) {
    printf("%s", label);
    for (size_t i = 0; i < n; i++) {
        printf(" %d", tokens[i]);
    }
    printf("\n");
}

int main(int argc, char ** argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s MODEL MMPROJ|- RGB|- WIDTH HEIGHT PROMPT N_GREEDY LOGITS_OUT\n", argv[0]);
        return 2;
    }
    const std::string mmproj = argv[2], rgb = argv[3], prompt = argv[6];
    const int width = atoi(argv[4]), height = atoi(argv[5]), n_greedy = atoi(argv[7]);

    llama_log_set(errors_only, nullptr);
    mtmd_helper_log_set(errors_only, nullptr);
    llama_backend_init();

    // LLAMA_ARG_REPACK=0 turns weight repacking off, as it does for llama.cpp's own tools (-nr): on CPUs
    // with AMX, 0.3.36's AMX q8_0 matmul crashes (ggml-org/llama.cpp#20824)
    llama_model_params mparams_model = llama_model_default_params();
    const char * repack = getenv("LLAMA_ARG_REPACK");
    if (repack && (!strcmp(repack, "0") || !strcmp(repack, "false") || !strcmp(repack, "off"))) {
        mparams_model.use_extra_bufts = false;
    }
    llama_model * model = llama_model_load_from_file(argv[1], mparams_model);
    if (!model) {
        return fail("cannot load the model");
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 4096;
    cparams.n_batch = 4096;
    cparams.n_ubatch = 4096;
    cparams.n_threads = 2;
    cparams.n_threads_batch = 2;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        return fail("cannot create a context");
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    if (mmproj != "-") {
        mtmd_context_params mparams = mtmd_context_params_default();
        mparams.use_gpu = false;
        mparams.n_threads = 2;
        mparams.print_timings = false;
        mparams.warmup = false;
        mtmd_context * mctx = mtmd_init_from_file(mmproj.c_str(), model, mparams);
        if (!mctx) {
            return fail("cannot load the mmproj");
        }
        std::ifstream in(rgb, std::ios::binary);
        std::vector<unsigned char> pixels((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        if ((int) pixels.size() != width * height * 3) {
            return fail("the RGB file is not WIDTH x HEIGHT x 3 bytes");
        }
        mtmd_bitmap * bitmap = mtmd_bitmap_init(width, height, pixels.data());
        mtmd_input_text text = {prompt.c_str(), prompt.size(), true, true};
        mtmd_input_chunks * chunks = mtmd_input_chunks_init();
        const mtmd_bitmap * bitmaps[] = {bitmap};
        if (mtmd_tokenize(mctx, chunks, &text, bitmaps, 1) != 0) {
            return fail("mtmd_tokenize failed (is there exactly one media marker in the prompt?)");
        }
        for (size_t i = 0; i < mtmd_input_chunks_size(chunks); i++) {
            const mtmd_input_chunk * chunk = mtmd_input_chunks_get(chunks, i);
            if (mtmd_input_chunk_get_type(chunk) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
                size_t n = 0;
                const llama_token * tokens = mtmd_input_chunk_get_tokens_text(chunk, &n);
                print_tokens("text", tokens, n);
            } else {
                printf("image %zu\n", mtmd_input_chunk_get_n_tokens(chunk));
            }
        }
        llama_pos n_past = 0;
        if (mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, cparams.n_batch, true, &n_past) != 0) {
            return fail("mtmd_helper_eval_chunks failed");
        }
    } else {
        std::vector<llama_token> tokens(prompt.size() + 16);
        const int n = llama_tokenize(vocab, prompt.c_str(), prompt.size(), tokens.data(), tokens.size(), true, true);
        if (n < 0) {
            return fail("llama_tokenize failed");
        }
        tokens.resize(n);
        print_tokens("text", tokens.data(), tokens.size());
        if (llama_decode(ctx, llama_batch_get_one(tokens.data(), n)) != 0) {
            return fail("llama_decode failed");
        }
    }

    const float * logits = llama_get_logits_ith(ctx, -1);
    FILE * out = fopen(argv[8], "wb");
    if (!out || fwrite(logits, sizeof(float), n_vocab, out) != (size_t) n_vocab) {
        return fail("cannot write the logits");
    }
    fclose(out);

    std::vector<llama_token> greedy;
    for (int step = 0; step < n_greedy; step++) {
        llama_token best = 0;
        for (int t = 1; t < n_vocab; t++) {
            if (logits[t] > logits[best]) {
                best = t;
            }
        }
        greedy.push_back(best);
        if (llama_decode(ctx, llama_batch_get_one(&greedy.back(), 1)) != 0) {
            return fail("llama_decode failed");
        }
        logits = llama_get_logits_ith(ctx, -1);
    }
    print_tokens("greedy", greedy.data(), greedy.size());
    return 0;
}
