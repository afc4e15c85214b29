"""Defaults shared by the library, the command line and the report, in one torch-free module
(``--help`` imports neither torch nor TVM)."""

SWEEPS = 2  # gptq: coordinate-descent passes over the codes after the column loop

# compile(terms="auto"): signed power-of-two terms per scale for each plane (most significant
# first) at each width. Measured on SmolLM2-135M through the .so (README, "Terms per plane"):
# 3 bits with 3,2,2 terms has the perplexity of 3,3,3 at 2 fewer terms (a faster kernel, 0.125
# fewer bits per weight); 2 bits keeps 3,3 (3,2 cost 1-5%).
TERMS_AUTO = {1: (3,), 2: (3,), 3: (3, 2), 4: (4, 3, 2)}  # the last count repeats: 4,3,2,2

# calibration windows of 512 tokens: compile (the main job, ~10 minutes on 2 cores) and the
# accuracy report (README "Accuracy": 64 windows took 3 bits from 1.445x to 1.351x and 4 bits from
# 1.109x to 1.098x on Wikipedia, for ~5 more minutes of scale tuning per row here)
CALIB_WINDOWS = 32
REPORT_CALIB_WINDOWS = 64
REPORT_TUNE_WINDOWS = REPORT_CALIB_WINDOWS - 2  # every calibration window but the 2 held out

# end-to-end scale tuning (finetune.ScaleTuning)
TUNE_EPOCHS = 1
TUNE_WINDOWS = 30  # calibration windows trained on (2 more are held out)
TUNE_LR = 1e-4  # step RMS of the log-scales near float
TUNE_KL_REF = 0.15  # step = lr * max(1, sqrt(held-out KL / kl_ref))

# CPU LUT kernel tables: "auto" = int8 tables where the target has the ISA (AVX-512 VBMI+VNNI,
# AVX2, NEON), float tables elsewhere; "float" = float tables everywhere (exact activations)
TABLES = ("auto", "int8", "float")
