package main

import (
	"context"
	"testing"
	"time"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
)

// BenchmarkPolicySwap measures a policy swap from the command to the new
// selection state in force (as xlbd reports it: the new plugin started,
// its table computed, checked and swapped in, the old plugin stopped),
// alternating between two built-in policies.
func BenchmarkPolicySwap(b *testing.B) {
	tp := newTopo(b, "native", "--policy", "random")
	c := tp.d.Client()
	policies := []string{"hash", "least-conn", "random"}
	var total time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r, err := c.SetPolicy(context.Background(), &controlpb.SetPolicyRequest{Policy: policies[i%len(policies)]})
		if err != nil {
			b.Fatal(err)
		}
		total += r.GetTook().AsDuration()
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/swap")
}
