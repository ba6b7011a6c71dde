import json,sys,urllib.request,subprocess,time
exsa,model=sys.argv[1],sys.argv[2]
def start(snap):
    p=subprocess.Popen([exsa,"--log","error","--server-log","warn","--threads","2","--recurrent-snapshots",str(snap),"--model",model,"serve","--port","0","--parallel","1"],stdout=subprocess.PIPE,stderr=subprocess.DEVNULL,text=True)
    b=p.stdout.readline().strip().removeprefix("listening on ")
    while True:
        try:
            if urllib.request.urlopen(b+"/health").status==200: break
        except Exception: time.sleep(0.2)
    return p,b
S={s:start(s) for s in (8,0)}
G='root ::= (" one two three" (" four" | " five" | " six"))+'
for r in range(3):
    for g in (None,G):
        for s in ((8,0) if r%2==0 else (0,8)):
            body={"prompt":"one two three four five","max_tokens":96,"temperature":1.0,"seed":r,"ignore_eos":True}
            if g: body["grammar"]=g
            o=json.load(urllib.request.urlopen(urllib.request.Request(S[s][1]+"/v1/completions",json.dumps(body).encode(),{"content-type":"application/json"})))
            print(r, "grammar" if g else "plain", s, round(o["timings"]["predicted_per_second"],2))
for p,b in S.values(): p.terminate()
