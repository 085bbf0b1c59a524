#!/bin/bash
# usage: smoke.sh BIN [PORT]: starts the tool, asks it the calls the Solana tests will need, stops it.
BIN=$1; PORT=${2:-18899}; URL=http://127.0.0.1:$PORT
rpc(){ curl -s -m 10 -H 'content-type: application/json' -d "$1" $URL; echo; }
t0=$(date +%s.%N)
$BIN $PORT > "${TMPDIR:-/tmp}/surfnet-tool.out" 2> "${TMPDIR:-/tmp}/surfnet-tool.err" &
PID=$!
echo "pid $PID"
for i in $(seq 1 600); do
  r=$(curl -s -m 1 -H 'content-type: application/json' -d '{"jsonrpc":"2.0","id":1,"method":"getHealth"}' $URL) && [ -n "$r" ] && break
  sleep 0.1
done
t1=$(date +%s.%N)
echo "first getHealth answer after $(echo "$t1 - $t0" | bc) s: $r"
for m in getHealth getVersion getSlot getLatestBlockhash getGenesisHash getEpochInfo; do
  echo "== $m"; rpc "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"$m\"}"
done
OWNER=9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM
USDC=EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v
echo "== getBalance before airdrop"; rpc "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"getBalance\",\"params\":[\"$OWNER\"]}"
echo "== requestAirdrop"; rpc "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"requestAirdrop\",\"params\":[\"$OWNER\",1000000000]}"
sleep 1
echo "== getBalance after airdrop"; rpc "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"getBalance\",\"params\":[\"$OWNER\"]}"
echo "== surfnet_setTokenAccount"; rpc "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"surfnet_setTokenAccount\",\"params\":[\"$OWNER\",\"$USDC\",{\"amount\":1000000,\"state\":\"initialized\"}]}"
echo "== getTokenAccountsByOwner"; rpc "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"getTokenAccountsByOwner\",\"params\":[\"$OWNER\",{\"mint\":\"$USDC\"},{\"encoding\":\"jsonParsed\"}]}"
echo "== RSS (kB) of pid $PID:"; grep -E 'VmRSS|VmHWM' /proc/$PID/status
echo "== threads: $(ls /proc/$PID/task | wc -l)"
kill $PID; wait $PID 2>/dev/null; echo "stopped rc=$?"
