import json, sys
recs=[json.loads(l) for l in open(sys.argv[1])]
def pick(r, K, wg, wp):
    c=r['cands'][:K]
    sc=[x['cos']+wg*x['gen']+wp*sum(x['prompt'])/len(x['prompt']) for x in c]
    return c[max(range(len(c)), key=lambda i:(sc[i], -i))]
for K in (2,3,4):
  for wg in (0,0.2):
    for wp in (0,0.1,0.3,1,3):
        hits=[pick(r,K,wg,wp)['hit'] for r in recs]
        by={}
        for r,h in zip(recs,hits): by.setdefault(r['task'],[]).append(int(h))
        print(K,wg,wp,sum(hits),len(hits),{k[5:]:sum(v) for k,v in by.items()})
