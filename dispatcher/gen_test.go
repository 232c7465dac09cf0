package dispatcher

// Programs that only the tests and benchmarks load: generated into _test
// files so they never ship in the dispatcher package. floor is the
// benchmark floor; mirror runs the data path's functions that Go mirrors
// (TestMirrorsAgree).
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -I../programs/include" -target amd64 floor ../programs/floor.c
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -I../programs/include" -target amd64 -type mirror_io mirror testdata/mirror.c
