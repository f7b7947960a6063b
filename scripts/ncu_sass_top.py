import csv, sys, glob, os, collections
f = glob.glob(os.environ['OUT'] + '/ncu-source-sass-*.csv')[0]
rows = list(csv.reader(open(f, errors='replace')))
hi = next(i for i, r in enumerate(rows) if any('Sampling' in c for c in r))
h = rows[hi]
print('columns:', [c for c in h][:30])
col = next(i for i, c in enumerate(h) if 'Warp Stall Sampling (All' in c)
src = next(i for i, c in enumerate(h) if c.strip() in ('Source', 'Sass', 'SASS'))
addr = next((i for i, c in enumerate(h) if 'Address' in c), 0)
data = []
for r in rows[hi + 1:]:
    try:
        data.append((float(r[col]), r[addr], r[src]))
    except (ValueError, IndexError):
        pass
tot = sum(d[0] for d in data)
print('total samples', tot, 'instructions', len(data))
for v, a, s in sorted(data, reverse=True)[:60]:
    print('%7.0f %5.2f%% %s %s' % (v, 100 * v / tot, a, s[:100]))
# windows: samples per 64-instruction window, to see which code regions dominate
win = collections.Counter()
for i, (v, a, s) in enumerate(data):
    win[i // 256] += v
print('top regions (256-instruction windows):')
for k, v in win.most_common(12):
    print('  window %4d (instr %6d..): %5.1f%%  first: %s' % (k, k * 256, 100 * v / tot, data[k * 256][2][:60]))
