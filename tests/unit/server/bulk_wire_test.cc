// The bulk streams' wire format, both ends: the daemon's BulkMessage (header serialised, data
// field written by hand as slices) read back by protobuf itself and by the C++ client's
// WireReader, whatever the slices' boundaries.
#include <random>
#include <string>
#include <vector>

#include "clients/cpp/bulk_stream.h"
#include "gtest/gtest.h"
#include "ropekv/v1/kvcache.pb.h"
#include "server/stream_reactor.h"

namespace ropekv {
namespace {

std::string Bytes(grpc::ByteBuffer& bb) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(bb.Dump(&slices).ok());
  std::string out;
  for (const grpc::Slice& s : slices)
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// A BulkMessage of `data` cut into slices at `cuts`, with a header when `header` is set.
grpc::ByteBuffer Serialized(const std::string& data, const std::vector<size_t>& cuts,
                            const v1::GetHeader* header) {
  BulkMessage m;
  if (header != nullptr) {
    v1::GetResponse first;
    *first.mutable_header() = *header;
    m.head = first.SerializeAsString();
  }
  m.data_tag = (v1::GetResponse::descriptor()->FindFieldByName("data")->number() << 3) | 2;
  size_t at = 0;
  for (size_t end : cuts) {
    m.data.emplace_back(data.data() + at, end - at);
    at = end;
  }
  m.data.emplace_back(data.data() + at, data.size() - at);
  m.data_bytes = data.size();
  grpc::ByteBuffer bb;
  bool own = false;
  EXPECT_TRUE(grpc::SerializationTraits<BulkMessage>::Serialize(m, &bb, &own).ok());
  return bb;
}

TEST(BulkWireTest, ProtobufReadsWhatTheDaemonWrites) {
  std::mt19937_64 rng(1);
  for (size_t n : {size_t{0}, size_t{1}, size_t{127}, size_t{128}, size_t{300000}}) {
    std::string data(n, '\0');
    for (char& c : data) c = static_cast<char>(rng());
    v1::GetHeader h;
    h.set_blocks(3);
    h.set_block_bytes(n);
    std::vector<size_t> cuts;
    if (n > 2) cuts = {n / 3, n / 2};
    grpc::ByteBuffer bb = Serialized(data, cuts, n % 2 == 0 ? &h : nullptr);
    v1::GetResponse parsed;
    ASSERT_TRUE(parsed.ParseFromString(Bytes(bb))) << n;
    EXPECT_EQ(parsed.data(), data) << n;
    EXPECT_EQ(parsed.has_header(), n % 2 == 0) << n;
    if (n % 2 == 0) EXPECT_EQ(parsed.header().block_bytes(), n);
  }
}

// The client's reader over a message re-cut into slices at every place: varints and the data
// field straddle the boundaries.
TEST(BulkWireTest, WireReaderReadsAcrossAnySliceBoundary) {
  v1::GetResponse msg;
  msg.mutable_header()->set_blocks(7);
  msg.mutable_header()->set_matched_tokens(1234567);
  std::string data(200, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 37 + 11);
  msg.set_data(data);
  const std::string wire = msg.SerializeAsString();
  const uint64_t header_field = 1, data_field = 2;
  for (size_t cut = 0; cut <= wire.size(); ++cut) {
    grpc::Slice parts[2] = {grpc::Slice(wire.data(), cut),
                            grpc::Slice(wire.data() + cut, wire.size() - cut)};
    grpc::ByteBuffer bb(parts, 2);
    client::WireReader in(bb);
    std::string header_bytes, got;
    int pieces = 0;
    while (!in.done()) {
      uint64_t tag = 0, len = 0;
      ASSERT_TRUE(in.Varint(&tag)) << cut;
      ASSERT_EQ(tag & 7, 2u) << cut;
      ASSERT_TRUE(in.Varint(&len)) << cut;
      std::string* into = (tag >> 3) == header_field ? &header_bytes : &got;
      ASSERT_TRUE((tag >> 3) == header_field || (tag >> 3) == data_field) << cut;
      ASSERT_TRUE(in.Take(len, [&](absl::string_view p) {
        into->append(p.data(), p.size());
        ++pieces;
      })) << cut;
    }
    EXPECT_EQ(got, data) << cut;
    v1::GetHeader h;
    ASSERT_TRUE(h.ParseFromString(header_bytes)) << cut;
    EXPECT_EQ(h.matched_tokens(), 1234567u) << cut;
    EXPECT_GE(pieces, 2) << cut;
  }
  // Cut short: the reader says so instead of reading past the end.
  grpc::Slice whole(wire.data(), wire.size() - 1);
  grpc::ByteBuffer short_bb(&whole, 1);
  client::WireReader in(short_bb);
  uint64_t v = 0;
  bool ok = true;
  while (ok && !in.done()) {
    ok = in.Varint(&v) && in.Varint(&v) && in.Take(v, [](absl::string_view) {});
  }
  EXPECT_FALSE(ok);
}

}  // namespace
}  // namespace ropekv
