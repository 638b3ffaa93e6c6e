# results_moe_vs_dense.py (nanoGPT's CPU recipe, MoE against its dense twin) on the default
# 'domains' dataset instead of tiny Shakespeare.
#   python compare.py config/results_moe_vs_dense_domains.py --jobs=2
# writes out-results-moe-vs-dense-domains/results.md and curves.png (RESULTS.md has them).
import os

exec(open(os.path.join(os.path.dirname(__file__), 'results_moe_vs_dense.py')).read())

train = {**train, 'dataset': 'domains'}
compare_dir = 'out-results-moe-vs-dense-domains'
