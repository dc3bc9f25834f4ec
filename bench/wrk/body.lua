-- wrk script: the same POST /v1/query body for every request.
--
--   wrk -t1 -c16 -d5s -s bench/wrk/body.lua http://127.0.0.1:8080 -- '{"sql": "select 1"}'
function init(args)
   wrk.method = "POST"
   wrk.path = "/v1/query"
   wrk.headers["Content-Type"] = "application/json"
   wrk.body = args[1]
end
