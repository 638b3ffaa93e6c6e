# nanoGPT's fine-tuning recipe: OpenAI's GPT-2 (124M) on tiny Shakespeare in GPT-2's BPE.
# For a GPU; not run by the project (it downloads GPT-2 from the Hugging Face hub, and
# its 124M parameters at a context of 1024 are not a job for the 2-core CPU).
# First:  pip install transformers; python data/shakespeare/prepare.py
# Then:   python train.py config/finetune_shakespeare.py
# GPT-2 loads dense (n_exp = 1): it has biases, and the experts have none, so it cannot be
# upcycled into an MoE here; a bias=False checkpoint of this project can.

init_from = 'gpt2'  # or 'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a Hugging Face GPT-2 folder
out_dir = 'out-shakespeare-gpt2'
dataset = 'shakespeare'
n_exp = 1

eval_interval = 5
eval_iters = 40
always_save_checkpoint = False  # save only when val improves

# 8 * 4 * 1024 = 32,768 tokens per iteration, as nanoGPT's 1 * 32 * 1024
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 20

learning_rate = 3e-5  # a constant, small rate: the weights are already good
decay_lr = False
dropout = 0.1
