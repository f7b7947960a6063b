"""Summarise Nsight Compute's per-SASS-instruction warp-stall samples (gpu_checks.py stage ncu, MK_NCU_SOURCE=1).

Prints the columns, the most-sampled instructions, the most-sampled 256-instruction windows, and, when the kernel
was built with -lineinfo and the export carries a source-location column, the most-sampled CUDA source lines.
Usage: OUT=dir python3 scripts/ncu_sass_top.py [file.csv]
"""
import collections
import csv
import glob
import os
import sys

f = sys.argv[1] if len(sys.argv) > 1 else glob.glob(os.environ['OUT'] + '/ncu-source-sass-*.csv')[0]
rows = list(csv.reader(open(f, errors='replace')))
# For an export whose header row was lost (gpu_checks.py cut the CSV's head off before bb46b84): the column order of
# the H100 export of session 7 (bench/results/2026-11-24-h100-ncu-0db422d-sass-top-*), which the 3353c1a file matches
# in width and, for all but the barrier column, in proportions against Nsight's WarpStateStats of the same run
STALLS = ('barrier branch_resolving dispatch drain imc lg long_sb math membar mio misc no_inst not_selected selected '
          'short_sb sleep tex wait').split()
KNOWN = (['Address', 'Source', 'Warp Stall Sampling (All Samples)', 'Warp Stall Sampling (Not-issued Samples)',
          '# Samples', 'Instructions Executed'] + ['-'] * 26 + ['stall_' + k for k in STALLS])
hi = next((i for i, r in enumerate(rows) if any('Sampling' in c for c in r)), None)
if hi is None:
    first = next((i for i, r in enumerate(rows) if r and r[0].startswith('0x') and len(r) >= len(KNOWN)), None)
    if first is None:
        sys.exit('no sampling columns in %s; it begins: %r' % (f, rows[:6]))
    print('no header row: assuming the known column order')
    hi = first - 1
    h = KNOWN + ['-'] * (len(rows[first]) - len(KNOWN))
else:
    h = rows[hi]
print('columns:', h)
for r in rows[hi + 1:hi + 3]:
    print('row:', r)
col = next(i for i, c in enumerate(h) if 'Warp Stall Sampling (All' in c)
src = next(i for i, c in enumerate(h) if c.strip() in ('Source', 'Sass', 'SASS'))
addr = next((i for i, c in enumerate(h) if 'Address' in c), 0)
where = [i for i, c in enumerate(h) if any(k in c for k in ('Line', 'Location', 'File'))]
data = []
for r in rows[hi + 1:]:
    try:
        data.append((float(r[col]), r[addr], r[src], tuple(r[i] for i in where)))
    except (ValueError, IndexError):
        pass
tot = sum(d[0] for d in data) or 1
ex = next((i for i, c in enumerate(h) if c.strip().startswith('Instructions Executed')), None)
if ex is not None:  # where the instructions go (time = instructions / issue rate)
    cnt = []
    for i, r in enumerate(rows[hi + 1:]):
        try:
            cnt.append((float(r[ex] or 0), i, r[src]))
        except (ValueError, IndexError):
            pass
    tx = sum(c[0] for c in cnt) or 1
    print('instructions executed', tx)
    for v, i, s in sorted(cnt, reverse=True)[:40]:
        print('%12.0f %5.2f%% #%d %s' % (v, 100 * v / tx, i, s[:90]))
    byw = collections.Counter()
    for v, i, s in cnt:
        byw[i // 128] += v
    print('instructions executed by 128-instruction window:')
    for k, v in byw.most_common(40):
        print('  window %5d (instr %6d..): %5.2f%%  %s' % (k, k * 128, 100 * v / tx, rows[hi + 1 + k * 128][src][:60]))
print('total samples', tot, 'instructions', len(data))
for v, a, s, w in sorted(data, reverse=True)[:50]:
    print('%7.0f %5.2f%% %s %s %s' % (v, 100 * v / tot, a, s[:70], ' '.join(w)[:60]))
# per window: the opcode mix of what it executed and the stall reasons of its samples
stall_cols = [(i, c[len('stall_'):]) for i, c in enumerate(h) if c.startswith('stall_') and 'Not Issued' not in c]
if ex is not None:
    print('top regions by samples, with their opcodes (share of instructions) and stalls (share of samples):')
    agg = collections.defaultdict(lambda: [0.0, 0.0, collections.Counter(), collections.Counter()])
    for i, r in enumerate(rows[hi + 1:]):
        if len(r) <= max([ex, col] + [c for c, _ in stall_cols]) or not r[0].startswith('0x'):
            continue
        a = agg[i // 256]
        e, v = float(r[ex] or 0), float(r[col] or 0)
        a[0] += e
        a[1] += v
        words = r[src].split()
        if words:
            a[2][(words[1] if words[0].startswith('@') and len(words) > 1 else words[0]).split('.')[0]] += e
        for c, n in stall_cols:
            a[3][n] += float(r[c] or 0)
    te = sum(a[0] for a in agg.values()) or 1
    ts = sum(a[1] for a in agg.values()) or 1
    for k, (e, v, ops, st) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:15]:
        ns = sum(st.values()) or 1
        print('  window %4d: %5.2f%% of instructions, %5.2f%% of samples; %s | %s' % (
            k, 100 * e / te, 100 * v / ts, ', '.join('%s %.0f%%' % (o, 100 * x / (e or 1)) for o, x in ops.most_common(5)),
            ', '.join('%s %.0f%%' % (n, 100 * x / ns) for n, x in st.most_common(4))))
    tot_st = collections.Counter()
    for a in agg.values():
        tot_st.update(a[3])
    ns = sum(tot_st.values()) or 1
    print('stall reasons over all samples:', ', '.join('%s %.1f%%' % (n, 100 * x / ns) for n, x in tot_st.most_common(8)))
if where:
    by = collections.Counter()
    for v, a, s, w in data:
        by[w] += v
    print('top source locations:')
    for k, v in by.most_common(60):
        print('  %5.2f%% %s' % (100 * v / tot, ' '.join(k)[:120]))
