package balancer

import (
	"context"
	"errors"

	"github.com/xlb-project/xlb/dispatcher"
)

// Uniform is the built-in selector: random selection in proportion to
// the backends' weights (each backend appears weight/gcd times in the
// table). Policy plugins replace it.
type Uniform struct{}

// Select implements Selector.
func (Uniform) Select(_ context.Context, svc ServiceState) (Selection, error) {
	g := uint32(0)
	for _, b := range svc.Backends {
		if b.Weight > 0 {
			g = gcd(g, b.Weight)
		}
	}
	if g == 0 {
		return Selection{}, errors.New("no backend with a weight above 0")
	}
	var table []int
	for i, b := range svc.Backends {
		for n := b.Weight / g; n > 0 && len(table) < dispatcher.MaxTable; n-- {
			table = append(table, i)
		}
	}
	return Selection{Mode: dispatcher.ModeRandom, Table: table}, nil
}

func gcd(a, b uint32) uint32 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}
