package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
)

var (
	addrType      = reflect.TypeFor[netip.Addr]()
	addrPortType  = reflect.TypeFor[netip.AddrPort]()
	portRangeType = reflect.TypeFor[PortRange]()
	addrPoolType  = reflect.TypeFor[AddrPool]()
	durationType  = reflect.TypeFor[time.Duration]()
	backendType   = reflect.TypeFor[Backend]()
)

// decodeHook converts the text forms of the configuration's types: IP
// addresses, IP:PORT, port ranges, durations, and backends given either as
// "IP:PORT[@WEIGHT]" or as a map with address and weight.
func decodeHook() mapstructure.DecodeHookFuncType {
	return func(from, to reflect.Type, data any) (any, error) {
		if from == to {
			return data, nil
		}
		kind := to.Kind()
		if kind == reflect.Pointer {
			kind = to.Elem().Kind()
		}
		switch kind {
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
			reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			// YAML reads 1024.7, 1.5e6 and integers beyond 64 bits as
			// floats, which a weak decode would truncate.
			if f, ok := data.(float64); ok {
				return nil, wholeNumberError(f)
			}
		case reflect.String:
			switch data.(type) {
			case int, int64, uint64, float64:
				return nil, fmt.Errorf("want text, got the number %v: YAML reads unquoted digits as a number; write the value in quotes", data)
			}
		}
		switch to {
		case addrType:
			s, ok := data.(string)
			if !ok {
				return nil, fmt.Errorf("want an IP address, got %v", data)
			}
			return parseAddr(s)
		case addrPortType:
			s, ok := data.(string)
			if !ok {
				return nil, fmt.Errorf("want IP:PORT, got %v", data)
			}
			return parseAddrPort(s)
		case portRangeType:
			// A lone port arrives from YAML as a number.
			if s, ok := data.(string); ok && s == "" {
				return PortRange{}, nil
			}
			return parsePortRange(fmt.Sprint(data))
		case addrPoolType:
			return parseAddrPool(data)
		case durationType:
			s, ok := data.(string)
			if !ok {
				return nil, fmt.Errorf("want a duration with a unit such as 900s or 15m, got %v", data)
			}
			d, err := time.ParseDuration(s)
			if err != nil {
				return nil, fmt.Errorf("parse duration %q: want a number with a unit such as 900s or 15m", s)
			}
			return d, nil
		case backendType:
			switch data := data.(type) {
			case string:
				return parseBackend(data)
			case map[string]any:
				return backendFromMap(data)
			default:
				return nil, fmt.Errorf("want IP:PORT or {address: IP:PORT, weight: N}, got %v", data)
			}
		}
		return data, nil
	}
}

// parseAddr parses an IP address; the empty string is the zero Addr.
func parseAddr(s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("parse address %q: not an IP address", s)
	}
	return a, nil
}

// parseAddrPool parses a list of addresses and prefixes, given as a list
// or as one string separated by commas or spaces.
func parseAddrPool(data any) (AddrPool, error) {
	var items []string
	switch d := data.(type) {
	case string:
		items = strings.FieldsFunc(d, func(r rune) bool { return r == ',' || r == ' ' })
	case []string:
		items = d
	case []any:
		for _, x := range d {
			s, ok := x.(string)
			if !ok {
				return nil, fmt.Errorf("want an address or prefix, got %v", x)
			}
			items = append(items, s)
		}
	default:
		return nil, fmt.Errorf("want a list of addresses and prefixes, got %v", data)
	}
	var out AddrPool
	for _, it := range items {
		it = strings.TrimSpace(it)
		if strings.Contains(it, "/") {
			pf, err := netip.ParsePrefix(it)
			if err != nil {
				return nil, fmt.Errorf("parse prefix %q: want ADDR/BITS", it)
			}
			out = append(out, pf)
			continue
		}
		a, err := parseAddr(it)
		if err != nil {
			return nil, err
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// parseAddrPort parses "IP:PORT".
func parseAddrPort(s string) (netip.AddrPort, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		if !strings.Contains(s, ":") {
			return netip.AddrPort{}, fmt.Errorf("parse address %q: missing port", s)
		}
		return netip.AddrPort{}, fmt.Errorf("parse address %q: want IP:PORT", s)
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("parse address %q: %q is not an IP address", s, host)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("parse address %q: %q is not a port", s, port)
	}
	return netip.AddrPortFrom(a, uint16(p)), nil
}

// parsePortRange parses "LO-HI". It does not check the range's bounds;
// Validate does.
func parsePortRange(s string) (PortRange, error) {
	lo, hi, ok := strings.Cut(s, "-")
	if !ok {
		return PortRange{}, fmt.Errorf("parse port range %q: want LO-HI", s)
	}
	l, err := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	if err != nil {
		return PortRange{}, fmt.Errorf("parse port range %q: %q is not a port", s, lo)
	}
	h, err := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	if err != nil {
		return PortRange{}, fmt.Errorf("parse port range %q: %q is not a port", s, hi)
	}
	return PortRange{Lo: uint16(l), Hi: uint16(h)}, nil
}

// parseBackend parses "IP:PORT" or "IP:PORT@WEIGHT". The weight is 1 when
// not given.
func parseBackend(s string) (Backend, error) {
	addr, weight, hasWeight := strings.Cut(s, "@")
	b := Backend{Weight: 1}
	var err error
	if b.Address, err = parseAddrPort(addr); err != nil {
		return Backend{}, err
	}
	if hasWeight {
		if b.Weight, err = parseWeight(weight); err != nil {
			return Backend{}, err
		}
	}
	return b, nil
}

// backendFromMap decodes {address: IP:PORT, weight: N}.
func backendFromMap(m map[string]any) (Backend, error) {
	b := Backend{Weight: 1}
	for _, k := range sortedKeys(m) {
		switch k {
		case "address", "weight", "health":
		default:
			return Backend{}, fmt.Errorf("unknown key %q", k)
		}
	}
	addr, ok := m["address"]
	if !ok {
		return Backend{}, errors.New("address: missing")
	}
	s, ok := addr.(string)
	if !ok {
		return Backend{}, fmt.Errorf("address: want IP:PORT, got %v", addr)
	}
	var err error
	if b.Address, err = parseAddrPort(s); err != nil {
		return Backend{}, fmt.Errorf("address: %w", err)
	}
	if w, ok := m["weight"]; ok {
		if f, ok := w.(float64); ok {
			return Backend{}, fmt.Errorf("weight: %w", wholeNumberError(f))
		}
		if b.Weight, err = parseWeight(fmt.Sprint(w)); err != nil {
			return Backend{}, fmt.Errorf("weight: %w", err)
		}
	}
	if h, ok := m["health"]; ok && h != nil {
		b.Health = new(Health)
		if err := decodeInto(h, b.Health); err != nil {
			return Backend{}, fmt.Errorf("health.%w", err)
		}
	}
	return b, nil
}

// decodeInto decodes raw into out as the configuration's decoder does,
// refusing unknown keys; errors are "key: problem".
func decodeInto(raw, out any) error {
	dec, err := mapstructure.NewDecoder(&mapstructure.DecoderConfig{DecodeHook: decodeHook(), ErrorUnused: true, Result: out})
	if err != nil {
		return fmt.Errorf("create decoder: %w", err)
	}
	if err := dec.Decode(raw); err != nil {
		return decodeError(err)
	}
	return nil
}

func parseWeight(s string) (uint32, error) {
	w, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("parse weight %q: not a whole number up to 65535", s)
	}
	return uint32(w), nil
}

// wholeNumberError refuses a float where a whole number is wanted.
func wholeNumberError(f float64) error {
	if f == math.Trunc(f) && math.Abs(f) >= 1<<63 {
		return fmt.Errorf("%s is too large", strconv.FormatFloat(f, 'g', -1, 64))
	}
	return fmt.Errorf("want a whole number, got %s (write it without a decimal point or an exponent)", strconv.FormatFloat(f, 'g', -1, 64))
}

// decodeError turns a mapstructure error into "key: problem", taking the
// first and innermost of the errors it may hold.
func decodeError(err error) error {
	var de *mapstructure.DecodeError
	if !errors.As(err, &de) {
		return fmt.Errorf("decode config: %w", err)
	}
	for {
		var inner *mapstructure.DecodeError
		if !errors.As(de.Unwrap(), &inner) {
			break
		}
		de = inner
	}
	cause := de.Unwrap()
	var pe *mapstructure.ParseError
	var ue *mapstructure.UnconvertibleTypeError
	switch {
	case errors.As(cause, &pe):
		cause = fmt.Errorf("%q is not a valid %s", fmt.Sprint(pe.Value), pe.Expected.Type())
	case errors.As(cause, &ue):
		cause = fmt.Errorf("want %s, got %v", ue.Expected.Type(), ue.Value)
	}
	return fmt.Errorf("%s: %w", de.Name(), cause)
}

// schema describes the shape of the configuration file, to refuse unknown
// keys at any depth with their full path.
type schema struct {
	fields   map[string]*schema // keys of a map; nil for a leaf or a list
	elem     *schema            // elements of a list
	anyKeys  bool               // a map with free keys and leaf values
	orString bool               // a map that may also be given as a string
}

var (
	leaf        = &schema{}
	healthShape = &schema{fields: map[string]*schema{
		"check":             leaf,
		"interval":          leaf,
		"timeout":           leaf,
		"rise":              leaf,
		"fall":              leaf,
		"reset-established": leaf,
		"http": {fields: map[string]*schema{
			"path":          leaf,
			"host":          leaf,
			"expect-status": leaf,
		}},
	}}
	rootShape = &schema{fields: map[string]*schema{
		"iface":              leaf,
		"xdp-mode":           leaf,
		"source-addresses":   leaf,
		"source-ports":       leaf,
		"policy":             leaf,
		"plugin-dir":         leaf,
		"plugin-sha256":      {anyKeys: true},
		"socket":             leaf,
		"socket-group":       leaf,
		"health-concurrency": leaf,
		"pin-path":           leaf,
		"log-level":          leaf,
		"log-format":         leaf,
		"metrics-address":    leaf,
		"xlb-priority":       leaf,
		"manage-vip":         leaf,
		"vip-filter":         leaf,
		"conntrack": {fields: map[string]*schema{
			"max-entries": leaf,
			"gc-interval": leaf,
			"timeouts": {fields: map[string]*schema{
				"syn":         leaf,
				"established": leaf,
				"fin":         leaf,
				"closed":      leaf,
				"time-wait":   leaf,
				"udp":         leaf,
			}},
		}},
		"syn-defence": {fields: map[string]*schema{
			"mode":      leaf,
			"half-open": leaf,
			"trust-for": leaf,
		}},
		"services": {elem: &schema{fields: map[string]*schema{
			"vip":              leaf,
			"protocol":         leaf,
			"policy":           leaf,
			"source-addresses": leaf,
			"manage-vip":       leaf,
			"health":           healthShape,
			"all-down":         leaf,
			"backends": {elem: &schema{orString: true, fields: map[string]*schema{
				"address": leaf,
				"weight":  leaf,
				"health":  healthShape,
			}}},
		}}},
		"chain": {elem: &schema{fields: map[string]*schema{
			"name":        leaf,
			"object":      leaf,
			"program":     leaf,
			"priority":    leaf,
			"continue-on": leaf,
		}}},
	}}
)

// checkKeys refuses keys of raw that the configuration does not have, and
// maps or lists where the other is expected.
func checkKeys(raw map[string]any) error {
	return rootShape.check("", raw)
}

func (s *schema) check(path string, val any) error {
	switch {
	case s.elem != nil:
		list, ok := val.([]any)
		if !ok {
			return fmt.Errorf("%s: want a list, got %v", path, val)
		}
		for i, e := range list {
			if err := s.elem.check(fmt.Sprintf("%s[%d]", path, i), e); err != nil {
				return err
			}
		}
		return nil
	case s.fields != nil || s.anyKeys:
		if _, ok := val.(string); ok && s.orString {
			return nil
		}
		m, ok := val.(map[string]any)
		if !ok {
			if path == "" {
				return fmt.Errorf("want a map at the top, got %v", val)
			}
			return fmt.Errorf("%s: want a map, got %v", path, val)
		}
		if s.anyKeys {
			return nil
		}
		for _, k := range sortedKeys(m) {
			sub := joinKey(path, k)
			f, ok := s.fields[k]
			if !ok {
				return fmt.Errorf("unknown key %q", sub)
			}
			if err := f.check(sub, m[k]); err != nil {
				return err
			}
		}
		return nil
	}
	return nil
}

func joinKey(path, k string) string {
	if path == "" {
		return k
	}
	return path + "." + k
}

// dropNulls removes map entries whose value is null, at any depth, so that
// "conntrack:" with nothing under it leaves the defaults alone.
func dropNulls(m map[string]any) {
	for k, v := range m {
		if v == nil {
			delete(m, k)
			continue
		}
		dropNullsIn(v)
	}
}

func dropNullsIn(v any) {
	switch v := v.(type) {
	case map[string]any:
		dropNulls(v)
	case []any:
		for _, e := range v {
			dropNullsIn(e)
		}
	}
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
