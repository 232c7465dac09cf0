package dispatcher

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/xlb-project/xlb/internal/testnet"
)

// BenchmarkChain reports the kernel's time per packet of the chain with
// 0, 1 and 3 members (pass_only: return XDP_PASS, continue on pass) in
// front of xlb, on a packet xlb passes, beside the floor (xlb_floor) run
// interleaved in the same loop, one packet per BPF_PROG_TEST_RUN. It
// reuses bench_test.go's testRun, mean and the floor objects.
//
// members-0 is xlb_dispatch attached directly (a chain of xlb alone).
func BenchmarkChain(b *testing.B) {
	testnet.RequirePrivileged(b)
	obj := chainMembersObject(b)
	p, err := Load(Options{ConntrackSize: 1024})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	var floor floorObjects
	if err := loadFloorObjects(&floor, nil); err != nil {
		b.Fatalf("load floor: %v", err)
	}
	defer floor.Close()
	pkt := chainPacket()

	for _, n := range []int{0, 1, 3} {
		b.Run(fmt.Sprintf("members-%d", n), func(b *testing.B) {
			entries := []ChainEntry{{Priority: DefaultPriority}}
			for i := range n {
				m, err := LoadMember(fmt.Sprintf("pass-%d", i), obj, "pass_only")
				if err != nil {
					b.Fatal(err)
				}
				if err := m.CreateMaps(); err != nil {
					b.Fatal(err)
				}
				defer m.Close()
				entries = append(entries, ChainEntry{Member: m, Priority: 10 + i})
			}
			SortChain(entries)
			prog, err := p.BuildChain(entries)
			if err != nil {
				b.Fatal(err)
			}
			defer prog.Close()

			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			tr := newTestRun(prog, 0, 2048)
			defer tr.close()
			fl := newTestRun(floor.XlbFloor, 0, 2048)
			defer fl.close()
			caseNs := make([]uint32, 0, b.N)
			floorNs := make([]uint32, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				v, d, err := fl.run(pkt)
				if err != nil || Verdict(v) != TX {
					b.Fatalf("floor run %d: verdict %s, %v", i, Verdict(v), err)
				}
				floorNs = append(floorNs, d)
				v, d, err = tr.run(pkt)
				if err != nil || Verdict(v) != Pass {
					b.Fatalf("chain run %d: verdict %s, %v", i, Verdict(v), err)
				}
				caseNs = append(caseNs, d)
			}
			b.StopTimer()
			c, f := mean(caseNs), mean(floorNs)
			b.ReportMetric(c, "bpf_ns/pkt")
			b.ReportMetric(c-f, "ns_above_floor/pkt")
		})
	}
}
