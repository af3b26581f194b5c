-- delay(): 50 ms before every request (not part of the latency).
function delay()
  return 50
end
