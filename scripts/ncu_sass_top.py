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
hi = next((i for i, r in enumerate(rows) if any('Sampling' in c for c in r)), None)
if hi is None:
    sys.exit('no sampling columns in %s; it begins: %r' % (f, rows[:6]))
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
win = collections.Counter()
for i, (v, a, s, w) in enumerate(data):
    win[i // 256] += v
print('top regions (256-instruction windows):')
for k, v in win.most_common(12):
    print('  window %4d (instr %6d..): %5.1f%%  first: %s' % (k, k * 256, 100 * v / tot, data[k * 256][2][:60]))
if where:
    by = collections.Counter()
    for v, a, s, w in data:
        by[w] += v
    print('top source locations:')
    for k, v in by.most_common(60):
        print('  %5.2f%% %s' % (100 * v / tot, ' '.join(k)[:120]))
