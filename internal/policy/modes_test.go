package policy

import (
	"strings"
	"testing"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/xlbtest"
	"github.com/xlb-project/xlb/plugins"
	policypb "github.com/xlb-project/xlb/plugins/proto"
)

// TestModesMatchDataPath proves the SDK's selection modes (the protocol's
// enum Mode) are the data path's (enum xlb_sel_mode in xlb_consts.h, read
// here from the BTF of the committed object): the same names, the same
// values, none missing on either side. The manager converts
// plugins.Mode to dispatcher.Mode by value, which this makes safe.
func TestModesMatchDataPath(t *testing.T) {
	c := map[string]uint64{}
	for _, v := range xlbtest.PipelineEnum(t, "xlb_sel_mode") {
		c[strings.TrimPrefix(v.Name, "XLB_SEL_")] = v.Value
	}
	proto := map[string]uint64{}
	for name, v := range policypb.Mode_value {
		if v != int32(policypb.Mode_MODE_UNSPECIFIED) {
			proto[strings.TrimPrefix(name, "MODE_")] = uint64(v)
		}
	}
	if len(c) != len(proto) {
		t.Errorf("xlb_sel_mode has %d modes %v, the protocol %d %v", len(c), c, len(proto), proto)
	}
	for name, v := range proto {
		cv, ok := c[name]
		if !ok || cv != v {
			t.Errorf("mode %s: protocol %d, data path %d (present %v)", name, v, cv, ok)
		}
	}
	for _, tc := range []struct {
		sdk plugins.Mode
		dp  dispatcher.Mode
	}{
		{plugins.ModeRandom, dispatcher.ModeRandom},
		{plugins.ModeHash, dispatcher.ModeHash},
		{plugins.ModeLeastConn, dispatcher.ModeLeastConn},
		{plugins.ModeRoundRobin, dispatcher.ModeRoundRobin},
	} {
		if dispatcher.Mode(tc.sdk) != tc.dp || tc.sdk.String() != tc.dp.String() {
			t.Errorf("SDK mode %s (%d) is data path mode %s (%d)", tc.sdk, tc.sdk, tc.dp, tc.dp)
		}
	}
	if n := len(proto); n != 4 {
		t.Errorf("the protocol has %d modes, the table above checks 4: add the new ones", n)
	}
}
